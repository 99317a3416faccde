import { type DescField, type DescMessage, ScalarType } from "@bufbuild/protobuf";
import { errors } from "../errors.js";

/**
 * The longest string any request field may carry, in UTF-16 code units. Every field has a
 * tighter rule of its own in its service (usernames 64, names 200, URLs 2048…); this
 * bound is for the fields that have none, so nothing unbounded reaches the database.
 */
export const MAX_STRING_LENGTH = 4096;

/**
 * Where a string is not acceptable as input: the index of its first control character
 * (C0 including NUL, DEL, C1) or lone UTF-16 surrogate, or -1.
 *
 * Why every field, passwords included: a NUL made SQLite and PostgreSQL fail the query
 * (a 500, and the SQL with its values in the log), and no field of the API has a use for
 * a control character. Passwords may hold any *printable* Unicode (NIST 800-63B); control
 * characters are not printable, and refusing them answers before any hash is computed.
 * A loop rather than a regex: lone surrogates need the pair check anyway, and this costs
 * nothing on the short strings of a request.
 */
export function invalidCharacterAt(s: string): number {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || (c >= 0x7f && c <= 0x9f)) return i;
    if (c >= 0xd800 && c <= 0xdfff) {
      // A high surrogate followed by a low one is a pair; anything else is lone.
      const next = s.charCodeAt(i + 1);
      if (c <= 0xdbff && next >= 0xdc00 && next <= 0xdfff) i++;
      else return i;
    }
  }
  return -1;
}

/** Throw InvalidArgument naming `field` (never echoing the value) when `s` is not acceptable input. */
export function assertInputString(s: string, field: string): void {
  if (s.length > MAX_STRING_LENGTH)
    throw errors.invalidArgument(`${field} must be at most ${MAX_STRING_LENGTH} characters`, field);
  if (invalidCharacterAt(s) >= 0)
    throw errors.invalidArgument(`${field} must not contain control characters`, field);
}

/** Whether a message type has a string anywhere in it (cached per type: most requests are checked with no walk at all). */
const hasStringsCache = new WeakMap<DescMessage, boolean>();

function hasStrings(desc: DescMessage, seen?: Set<DescMessage>): boolean {
  const cached = hasStringsCache.get(desc);
  if (cached !== undefined) return cached;
  // A recursive type is "in progress": the rest of its fields decide, not the recursion.
  if (seen?.has(desc)) return false;
  const inProgress = seen ?? new Set<DescMessage>();
  inProgress.add(desc);
  let found = false;
  for (const f of desc.fields) {
    const message = messageOf(f);
    if (isStringField(f) || (message !== undefined && hasStrings(message, inProgress))) {
      found = true;
      break;
    }
  }
  // Only the answer for the type asked about is final: a type met inside a cycle may have
  // been answered "no" while the cycle's strings were still unseen.
  if (seen === undefined || found) hasStringsCache.set(desc, found);
  return found;
}

/** The message type a field holds (singular, list or map value), if any. */
function messageOf(f: DescField): DescMessage | undefined {
  switch (f.fieldKind) {
    case "message":
      return f.message;
    case "list":
      return f.listKind === "message" ? f.message : undefined;
    case "map":
      return f.mapKind === "message" ? f.message : undefined;
    default:
      return undefined;
  }
}

function isStringField(f: DescField): boolean {
  switch (f.fieldKind) {
    case "scalar":
      return f.scalar === ScalarType.STRING;
    case "list":
      return f.listKind === "scalar" && f.scalar === ScalarType.STRING;
    case "map":
      return true; // keys of a map are strings or integers; checked below either way
    default:
      return false;
  }
}

/**
 * Check every string of a request message against {@link assertInputString}: singular,
 * optional, oneof, repeated, map keys and values, in nested messages too (the field named
 * by its path, e.g. `identity.san_uri` is `san_uri`, `metadata["k"]` is `metadata`).
 */
export function assertInputMessage(desc: DescMessage, message: unknown, prefix = ""): void {
  if (!hasStrings(desc)) return;
  const m = message as Record<string, unknown>;
  for (const f of desc.fields) {
    let value: unknown;
    if (f.oneof !== undefined) {
      const o = m[f.oneof.localName] as { case?: string; value?: unknown } | undefined;
      if (o?.case !== f.localName) continue;
      value = o.value;
    } else value = m[f.localName];
    if (value === undefined || value === null) continue;
    const name = prefix + f.name;
    switch (f.fieldKind) {
      case "scalar":
        if (typeof value === "string") assertInputString(value, name);
        break;
      case "enum":
        break;
      case "message":
        assertInputMessage(f.message, value, `${name}.`);
        break;
      case "list":
        for (const v of value as unknown[]) {
          if (typeof v === "string") assertInputString(v, name);
          else if (f.listKind === "message") assertInputMessage(f.message, v, `${name}.`);
        }
        break;
      case "map":
        for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
          assertInputString(k, name);
          if (typeof v === "string") assertInputString(v, name);
          else if (f.mapKind === "message") assertInputMessage(f.message, v, `${name}.`);
        }
        break;
    }
  }
}
