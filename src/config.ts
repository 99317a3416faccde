import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { adminSchema, authSchema } from "./config/auth.js";
import { databaseSchema } from "./config/database.js";
import { type ConfigKeyReference, referenceOf } from "./config/key-docs.js";
import { rateLimitSchema } from "./config/limits.js";
import { auditSchema, logSchema, metricsSchema } from "./config/operations.js";
import { corsSchema, serverSchema } from "./config/server.js";
import { verificationSchema } from "./config/verification.js";

/**
 * Tessera's configuration: a YAML file (path from `--config` or `TESSERA_CONFIG`)
 * overridden key by key by environment variables. Each section's schema lives in
 * src/config/ with every key's environment variable and meaning registered on it; the
 * reference ({@link CONFIG_REFERENCE}, docs/configuration.md) is read off the schema.
 * Unknown keys are errors, so a typo never silently falls back to a default.
 */

export { parseCidr, parseListen } from "./config/addresses.js";
export type { ConfigKeyReference } from "./config/key-docs.js";

const ConfigSchema = z
  .object({
    server: serverSchema,
    database: databaseSchema,
    admin: adminSchema,
    auth: authSchema,
    rateLimit: rateLimitSchema,
    cors: corsSchema,
    audit: auditSchema,
    log: logSchema,
    metrics: metricsSchema,
    verification: verificationSchema,
  })
  .strict();

/** The validated configuration. */
export type Config = z.infer<typeof ConfigSchema>;

/** Input shape accepted before defaults are applied (what a YAML file or a test provides). */
export type ConfigInput = z.input<typeof ConfigSchema>;

/**
 * Every configuration key with its environment variable, default and meaning, in the schema's
 * order: what the environment overrides are read by, and what docs/configuration.md renders.
 */
export const CONFIG_REFERENCE: readonly ConfigKeyReference[] = referenceOf(ConfigSchema);

/** Thrown when the configuration is invalid; the message lists every problem. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

function parseEnvValue(ref: ConfigKeyReference, raw: string): unknown {
  switch (ref.kind) {
    case "string":
      return raw;
    case "int": {
      if (!/^-?\d+$/.test(raw.trim())) throw new ConfigError(`${ref.env}: expected an integer, got "${raw}"`);
      return Number.parseInt(raw, 10);
    }
    case "bool": {
      const v = raw.trim().toLowerCase();
      if (["1", "true", "yes", "on"].includes(v)) return true;
      if (["0", "false", "no", "off"].includes(v)) return false;
      throw new ConfigError(`${ref.env}: expected true or false, got "${raw}"`);
    }
    case "list":
      return raw
        .split(",")
        .map((s) => s.trim())
        .filter((s) => s.length > 0);
  }
}

function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split(".");
  let node = target;
  for (const part of parts.slice(0, -1)) {
    const next = node[part];
    if (next === undefined || next === null || typeof next !== "object") node[part] = {};
    node = node[part] as Record<string, unknown>;
  }
  node[parts[parts.length - 1]!] = value;
}

/** Options for {@link loadConfig}. */
export interface LoadConfigOptions {
  /** YAML file; defaults to TESSERA_CONFIG when set. */
  file?: string;
  /** Environment to read overrides from; defaults to process.env. */
  env?: NodeJS.ProcessEnv;
  /** Values applied on top of file and environment (CLI flags, tests). */
  overrides?: ConfigInput;
}

function deepMerge(base: Record<string, unknown>, extra: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(extra)) {
    const cur = out[k];
    if (
      v &&
      typeof v === "object" &&
      !Array.isArray(v) &&
      cur &&
      typeof cur === "object" &&
      !Array.isArray(cur)
    ) {
      out[k] = deepMerge(cur as Record<string, unknown>, v as Record<string, unknown>);
    } else if (v !== undefined) {
      out[k] = v;
    }
  }
  return out;
}

/**
 * The YAML text of config file `file`. The parser's errors and warnings quote the offending
 * line, which in a config file may hold a password, a token or a database URL: a refusal
 * names only the position (printed at start-up, logged by a SIGHUP reload), and warnings (an
 * unknown tag: the value is read as plain text) are not emitted at all.
 * @throws ConfigError when the text is not valid YAML
 */
function parseConfigYaml(text: string, file: string): unknown {
  try {
    return parseYaml(text, { logLevel: "error" });
  } catch (err) {
    const at = (err as { linePos?: { line: number; col: number }[] }).linePos?.[0];
    throw new ConfigError(
      `config file ${file}: not valid YAML${at ? ` (line ${at.line}, column ${at.col})` : ""}`,
    );
  }
}

/**
 * Load, merge and validate the configuration: file, then environment, then overrides.
 * @throws ConfigError listing every invalid key with the variable that sets it.
 */
export function loadConfig(options: LoadConfigOptions = {}): Config {
  const env = options.env ?? process.env;
  const file = options.file ?? env.TESSERA_CONFIG;
  let raw: Record<string, unknown> = {};
  if (file) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      throw new ConfigError(`cannot read config file ${file}: ${(err as Error).message}`);
    }
    const parsed = parseConfigYaml(text, file);
    if (parsed !== null && parsed !== undefined) {
      if (typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new ConfigError(`config file ${file}: expected a mapping at the top level`);
      }
      raw = parsed as Record<string, unknown>;
    }
  }
  for (const ref of CONFIG_REFERENCE) {
    const value = env[ref.env];
    if (value !== undefined && value !== "") setPath(raw, ref.path, parseEnvValue(ref, value));
  }
  if (options.overrides) raw = deepMerge(raw, options.overrides as Record<string, unknown>);
  const result = ConfigSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => {
      const path = issue.path.join(".");
      const ref = CONFIG_REFERENCE.find((r) => r.path === path);
      const keys = issue.code === "unrecognized_keys" ? ` (${issue.keys.join(", ")})` : "";
      return `  ${path || "(root)"}${ref ? ` [${ref.env}]` : ""}: ${issue.message}${keys}`;
    });
    throw new ConfigError(`invalid configuration${file ? ` (${file})` : ""}:\n${lines.join("\n")}`);
  }
  return result.data;
}
