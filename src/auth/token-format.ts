import { randomBytes } from "node:crypto";
import { crc32 } from "node:zlib";

/**
 * Opaque token format, after GitHub's: `<prefix><id><secret><checksum>`, all base62 after
 * the prefix, so a token is one "word" that secret scanners can match and copy-paste
 * does not break.
 *
 * - id: 16 base62 characters (~95 random bits), the public identifier of the token's row,
 *   found with one indexed look-up;
 * - secret: 32 base62 characters (~190 bits from the CSPRNG), stored only as a PBKDF2 hash;
 * - checksum: CRC32 of everything before it, 6 base62 characters, so a typo is refused
 *   without touching the database (and never reaches PBKDF2).
 */
const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
export const TOKEN_ID_LENGTH = 16;
export const TOKEN_SECRET_LENGTH = 32;
const CHECKSUM_LENGTH = 6;
const BODY_RE = /^[0-9A-Za-z]+$/;

function randomBase62(length: number): string {
  // Rejection sampling keeps every character uniform (256 is not a multiple of 62).
  let out = "";
  while (out.length < length) {
    for (const byte of randomBytes(length * 2)) {
      if (byte < 248) out += ALPHABET[byte % 62];
      if (out.length === length) break;
    }
  }
  return out;
}

function base62(value: number, width: number): string {
  let out = "";
  let v = value >>> 0;
  do {
    out = ALPHABET[v % 62] + out;
    v = Math.floor(v / 62);
  } while (v > 0);
  return out.padStart(width, "0");
}

function checksum(text: string): string {
  return base62(crc32(text), CHECKSUM_LENGTH);
}

/** A token's parts. `secret` must never be logged or stored in clear. */
export interface ParsedToken {
  prefix: string;
  id: string;
  secret: string;
}

/** Generate a new token with the given prefix (e.g. `tsr_pat_`). */
export function generateToken(prefix: string): { token: string } & ParsedToken {
  const id = randomBase62(TOKEN_ID_LENGTH);
  const secret = randomBase62(TOKEN_SECRET_LENGTH);
  const head = `${prefix}${id}${secret}`;
  return { token: `${head}${checksum(head)}`, prefix, id, secret };
}

/**
 * Split a token with one of `prefixes`; null when it does not start with any of them.
 * Throws nothing: callers decide what a bad token means.
 * @returns "malformed" when the prefix matches but the length, alphabet or checksum is wrong.
 */
export function parseToken(token: string, prefixes: readonly string[]): ParsedToken | "malformed" | null {
  const prefix = prefixes.find((p) => token.startsWith(p));
  if (prefix === undefined) return null;
  const body = token.slice(prefix.length);
  if (body.length !== TOKEN_ID_LENGTH + TOKEN_SECRET_LENGTH + CHECKSUM_LENGTH || !BODY_RE.test(body))
    return "malformed";
  const head = token.slice(0, token.length - CHECKSUM_LENGTH);
  if (checksum(head) !== token.slice(-CHECKSUM_LENGTH)) return "malformed";
  return {
    prefix,
    id: body.slice(0, TOKEN_ID_LENGTH),
    secret: body.slice(TOKEN_ID_LENGTH, TOKEN_ID_LENGTH + TOKEN_SECRET_LENGTH),
  };
}

/**
 * Of `prefixes`, the longest `token` starts with (the first of equals), as the verifiers
 * decide: of two nested prefixes, `acme_` and `acme_key_`, the shorter would take the
 * longer's tokens. Undefined for none. Allocates nothing (it runs on every refused call's
 * metrics).
 */
export function longestPrefix(token: string, prefixes: readonly string[]): string | undefined {
  let found: string | undefined;
  for (let i = 0; i < prefixes.length; i++) {
    const p = prefixes[i]!;
    if (token.startsWith(p) && (found === undefined || p.length > found.length)) found = p;
  }
  return found;
}

/** What a list may show of a token: its prefix and last four characters. */
export function tokenHint(token: string, prefix: string): string {
  return `${prefix}…${token.slice(-4)}`;
}
