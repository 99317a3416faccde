import { TesseraError } from "../errors.js";
import { invalidCharacterAt } from "../interceptors/input.js";
import { ONE_AUTHORIZATION } from "./repeated-authorization.js";

/** A credential found in the request headers. Never log it. */
export type PresentedCredential =
  | { type: "bearer"; token: string }
  | { type: "api-key"; token: string }
  | { type: "basic"; username: string; password: string };

const TOKEN_CHARS = /^[\x21-\x7e]+$/;

/**
 * Bearer credentials parsed before, by the Authorization header's value, which they are a pure
 * function of: a client sends the same header on every call, and its parse (the token's
 * character check over a few hundred characters, two trims and slices) was a measurable share
 * of an authenticated call's event-loop instructions. The same frozen token string each time
 * also keeps its hash for the verifiers' caches. Emptied when full (a client cycling through
 * tokens costs what the parse costs). Never Basic credentials: no password is kept.
 */
const bearerByHeader = new Map<string, PresentedCredential>();
const BEARER_HEADERS_KEPT = 1024;
/**
 * Longest header remembered: Tessera's tokens are far shorter, and a count alone let made-up
 * tokens of tens of kilobytes (up to server.maxHeaderListSize) pin 1024 times that.
 */
const BEARER_HEADER_KEPT_CHARS = 4096;

/** Where request headers are read from: fetch `Headers`, or a view of Node's incoming headers. */
export interface HeaderSource {
  /** The header's value (repeats joined with ", ", as fetch Headers does), or null. */
  get(name: string): string | null;
}

/**
 * Read `Authorization: Bearer`, `Authorization: Basic` and `X-API-Key`. Two credentials
 * in one request are refused rather than guessed between.
 * @returns null when no credential was sent.
 * @throws TesseraError AUTH_HEADER_MALFORMED, MULTIPLE_CREDENTIALS
 */
export function parseCredentials(headers: HeaderSource): PresentedCredential | null {
  const authorization = headers.get("authorization");
  const apiKey = headers.get("x-api-key");
  if (authorization !== null && apiKey !== null) {
    throw new TesseraError(
      "MULTIPLE_CREDENTIALS",
      "send one credential: Authorization or X-API-Key, not both",
    );
  }
  if (apiKey !== null) {
    const token = apiKey.trim();
    // Headers joined from repeats arrive as "a, b".
    if (!token || !TOKEN_CHARS.test(token) || token.includes(",")) {
      throw new TesseraError("AUTH_HEADER_MALFORMED", "X-API-Key must hold exactly one key");
    }
    return { type: "api-key", token };
  }
  if (authorization === null) return null;
  const known = bearerByHeader.get(authorization);
  if (known !== undefined) return known;
  const value = authorization.trim();
  const space = value.indexOf(" ");
  if (space < 0)
    throw new TesseraError(
      "AUTH_HEADER_MALFORMED",
      "expected Authorization: Bearer <token> or Basic <credentials>",
    );
  const scheme = value.slice(0, space).toLowerCase();
  const rest = value.slice(space + 1).trim();
  // A repeated header, joined (the transports join the repeats Node keeps one of): two
  // credentials, refused as a repeated X-API-Key is, whichever of them is valid. Neither a
  // token nor base64 holds ", "; other schemes' values may (Digest), and are refused below.
  if ((scheme === "bearer" || scheme === "basic") && rest.includes(", "))
    throw new TesseraError("AUTH_HEADER_MALFORMED", ONE_AUTHORIZATION);
  if (scheme === "bearer") {
    if (!rest || !TOKEN_CHARS.test(rest) || rest.includes(",")) {
      throw new TesseraError("AUTH_HEADER_MALFORMED", "expected Authorization: Bearer <token>");
    }
    const credential: PresentedCredential = Object.freeze({ type: "bearer", token: rest });
    if (authorization.length <= BEARER_HEADER_KEPT_CHARS) {
      if (bearerByHeader.size >= BEARER_HEADERS_KEPT) bearerByHeader.clear();
      bearerByHeader.set(authorization, credential);
    }
    return credential;
  }
  if (scheme === "basic") {
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(rest)) {
      throw new TesseraError("AUTH_HEADER_MALFORMED", "Basic credentials must be base64");
    }
    const decoded = Buffer.from(rest, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    if (colon <= 0)
      throw new TesseraError("AUTH_HEADER_MALFORMED", "Basic credentials must be username:password");
    // RFC 7617 §2: no control characters in either part; a NUL would reach the database.
    if (invalidCharacterAt(decoded) >= 0)
      throw new TesseraError(
        "AUTH_HEADER_MALFORMED",
        "Basic credentials must not contain control characters",
      );
    return { type: "basic", username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
  }
  throw new TesseraError("AUTH_HEADER_MALFORMED", "unsupported Authorization scheme (use Bearer or Basic)");
}
