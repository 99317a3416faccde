// Each configuration key's environment variable and meaning is registered on its zod schema,
// next to its validation, so the reference (docs/configuration.md, the environment overrides)
// is read off the schema and cannot drift from it.
import { z } from "zod";

/** What a configuration key documents about itself, registered on its schema. */
export interface ConfigKeyDoc {
  /** The environment variable that overrides the key. */
  env: string;
  /** One or two sentences for docs/configuration.md. */
  description: string;
  /** The default as the reference shows it, when the schema has none to show (computed at start, generated). */
  shownDefault?: string;
}

/** The registry holding every configuration key's {@link ConfigKeyDoc}. */
export const configKeys = z.registry<ConfigKeyDoc>();

/** How an environment variable's text becomes the key's value. */
export type EnvKind = "string" | "int" | "bool" | "list";

/** One documented key: where it lives, the variable that overrides it, what it means. */
export interface ConfigKeyReference {
  path: string;
  env: string;
  kind: EnvKind;
  default: string;
  description: string;
}

type AnySchema = z.core.$ZodType;

/** The schema under its default, prefault, optional and nullable wrappers. */
function unwrap(schema: AnySchema): AnySchema {
  let s = schema;
  for (;;) {
    const def = s._zod.def as { type: string; innerType?: AnySchema };
    if (def.innerType === undefined) return s;
    if (!["default", "prefault", "optional", "nullable"].includes(def.type)) return s;
    s = def.innerType;
  }
}

function envKind(path: string, schema: AnySchema): EnvKind {
  const type = unwrap(schema)._zod.def.type;
  switch (type) {
    case "string":
    case "enum":
      return "string";
    case "number":
      return "int";
    case "boolean":
      return "bool";
    case "array":
      return "list";
    default:
      throw new Error(`config key ${path}: no environment syntax for a ${type}`);
  }
}

/** The default a key's schema applies, as the reference shows it. */
function shownDefault(schema: AnySchema): string {
  const parsed = z.safeParse(schema, undefined);
  if (!parsed.success || parsed.data === undefined) return "(unset)";
  if (Array.isArray(parsed.data)) return parsed.data.length === 0 ? "(none)" : parsed.data.join(",");
  return String(parsed.data);
}

/**
 * Every key of a configuration schema, in the schema's order, with its registered
 * documentation. A key (a non-object leaf) without one is a programming error.
 */
export function referenceOf(schema: AnySchema, prefix = ""): ConfigKeyReference[] {
  const def = unwrap(schema)._zod.def as { type: string; shape?: Record<string, AnySchema> };
  if (def.type !== "object" || def.shape === undefined)
    throw new Error(`config schema at ${prefix || "(root)"} is not an object`);
  return Object.entries(def.shape).flatMap(([name, field]) => {
    const path = prefix ? `${prefix}.${name}` : name;
    const doc = configKeys.get(field);
    if (doc === undefined) {
      if (unwrap(field)._zod.def.type === "object") return referenceOf(field, path);
      throw new Error(`config key ${path} has no environment variable and description registered`);
    }
    return [
      {
        path,
        env: doc.env,
        kind: envKind(path, field),
        default: doc.shownDefault ?? shownDefault(field),
        description: doc.description,
      },
    ];
  });
}
