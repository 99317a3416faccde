// Access tokens verified without asking Tessera: the signature under a key of Tessera's
// JWKS, with node:crypto. Only the algorithms Tessera signs with are accepted (EdDSA over
// Ed25519, ES256 over P-256), each only under a key of its own type: never `none`, never
// HMAC (a public key must never be usable as an HMAC secret), never a key the token names
// by URL or embeds (jku, x5u, jwk are not read).
import { createPublicKey, type KeyObject, verify } from "node:crypto";
import { TesseraAuthError } from "./errors.js";

/** The JWS algorithms an access token may be signed with. */
export type JwtAlgorithm = "EdDSA" | "ES256";
export const JWT_ALGORITHMS: readonly JwtAlgorithm[] = ["EdDSA", "ES256"];

/** Claims of a Tessera access token this verifier relies on. */
export interface AccessTokenClaims {
  sub: string;
  tid: string;
  scope: string;
  pk: "user" | "machine";
  iat: number;
  exp: number;
  nbf?: number;
  jti?: string;
  sid?: string;
  cnf?: { "x5t#S256"?: string };
  /** Authentication methods (RFC 8176), as Tessera wrote them: read by certificateAuthority alone. */
  amr?: unknown;
}

interface Key {
  alg: JwtAlgorithm;
  key: KeyObject;
}

/** Options of {@link createOfflineJwtVerifier}. */
export interface OfflineJwtOptions {
  /** Fetch the JWKS (`{ keys: JWK[] }`); rejects when Tessera cannot be reached. */
  fetchJwks: () => Promise<unknown>;
  issuer: string;
  audience: string;
  algorithms: readonly JwtAlgorithm[];
  /** Tolerated clock difference with Tessera, for `nbf` and `iat` (never added to `exp`). */
  clockSkewSeconds: number;
  /** Least time between two fetches caused by an unknown `kid`. */
  refetchGapMs: number;
  /** Age after which the JWKS is fetched again before use. */
  maxAgeMs: number;
  now: () => number;
  /** Told of every fetch's outcome: the error of one that failed, nothing for one that succeeded. */
  onFetched?: (error?: unknown) => void;
}

const B64URL = /^[A-Za-z0-9_-]+$/;
/** Least time between a failed JWKS fetch and the next attempt (or `refetchGapMs`, if shorter). */
const FAILED_FETCH_GAP_MS = 1000;
/** Longest access token considered at all (Tessera's are a few hundred bytes). */
const MAX_TOKEN_LENGTH = 8192;

/** Whether `token` has the shape of a compact JWS (three base64url parts). */
export function looksLikeJwt(token: string): boolean {
  const parts = token.split(".");
  return parts.length === 3 && parts.every((p) => B64URL.test(p));
}

function invalid(message: string): TesseraAuthError {
  return new TesseraAuthError("TOKEN_INVALID", message);
}

function decodeJson(part: string, what: string): Record<string, unknown> {
  try {
    const value = JSON.parse(Buffer.from(part, "base64url").toString("utf8")) as unknown;
    if (typeof value === "object" && value !== null && !Array.isArray(value))
      return value as Record<string, unknown>;
  } catch {
    // fall through
  }
  throw invalid(`access token ${what} is not a JSON object`);
}

/** The key of one JWK when it is of a type the allowlist admits (the JWK's own `alg` must agree). */
function importJwk(jwk: Record<string, unknown>, allowed: readonly JwtAlgorithm[]): Key | undefined {
  let alg: JwtAlgorithm | undefined;
  if (jwk.kty === "OKP" && jwk.crv === "Ed25519") alg = "EdDSA";
  else if (jwk.kty === "EC" && jwk.crv === "P-256") alg = "ES256";
  if (alg === undefined || !allowed.includes(alg)) return undefined;
  if (jwk.alg !== undefined && jwk.alg !== alg) return undefined;
  if (jwk.use !== undefined && jwk.use !== "sig") return undefined;
  const { d: _private, ...publicPart } = jwk;
  let key: KeyObject;
  try {
    key = createPublicKey({ key: publicPart as never, format: "jwk" });
  } catch {
    return undefined;
  }
  const type = key.asymmetricKeyType;
  if (alg === "EdDSA" && type !== "ed25519") return undefined;
  if (alg === "ES256" && (type !== "ec" || key.asymmetricKeyDetails?.namedCurve !== "prime256v1"))
    return undefined;
  return { alg, key };
}

/** An offline verifier of Tessera access tokens. */
export interface OfflineJwtVerifier {
  /**
   * The claims of `token` once its signature, algorithm, typ, iss, aud, exp and nbf/iat
   * check out. @throws TesseraAuthError TOKEN_INVALID, TOKEN_EXPIRED, or UNAVAILABLE when
   * no key set could be fetched.
   */
  verify(token: string): Promise<AccessTokenClaims>;
  /**
   * Whether the JWKS (fetched or refreshed as for a token) holds a key the allowlist accepts:
   * false on a Tessera signing HS256, which publishes none. @throws TesseraAuthError
   * UNAVAILABLE when no key set could ever be fetched.
   */
  hasKeys(): Promise<boolean>;
  /** Fetches of the JWKS so far (start, age, unknown kids). */
  readonly fetches: number;
  /** Key sets installed so far: moves on every successful fetch (a key may have left). */
  readonly keySet: number;
}

/**
 * Verify access tokens offline. The JWKS is fetched on first use, again once it is older
 * than `maxAgeMs`, and again when a token names an unknown `kid` — at most once per
 * `refetchGapMs`, whatever the number of tokens with made-up kids. Verified tokens are
 * remembered (bounded), so each pays for its signature check once; `exp` is re-checked on
 * every use, and a key that leaves the JWKS takes its tokens with it.
 */
export function createOfflineJwtVerifier(options: OfflineJwtOptions): OfflineJwtVerifier {
  const { now } = options;
  const skewMs = options.clockSkewSeconds * 1000;
  let keys = new Map<string, Key>();
  let fetchedAt = Number.NEGATIVE_INFINITY;
  let lastAttempt = Number.NEGATIVE_INFINITY;
  let inflight: Promise<void> | undefined;
  let fetches = 0;
  let keySet = 0;
  const verified = new Map<string, { claims: AccessTokenClaims; kid: string }>();
  const MAX_VERIFIED = 10_000;

  function refresh(): Promise<void> {
    inflight ??= (async () => {
      lastAttempt = now();
      fetches++;
      try {
        const body = (await options.fetchJwks()) as { keys?: unknown };
        if (!Array.isArray(body?.keys)) throw new Error("JWKS without keys");
        const next = new Map<string, Key>();
        for (const jwk of body.keys as Record<string, unknown>[]) {
          if (typeof jwk !== "object" || jwk === null || typeof jwk.kid !== "string") continue;
          const key = importJwk(jwk, options.algorithms);
          if (key) next.set(jwk.kid, key);
        }
        for (const [token, entry] of verified) if (!next.has(entry.kid)) verified.delete(token);
        keys = next;
        keySet++;
        fetchedAt = now();
        options.onFetched?.();
      } catch (err) {
        options.onFetched?.(err);
        throw err;
      } finally {
        inflight = undefined;
      }
    })();
    return inflight;
  }

  /**
   * The key set brought up to date where due: on first use, past `maxAgeMs`, or for a `kid`
   * it lacks (at most once per `refetchGapMs`). @throws UNAVAILABLE when no set was ever fetched.
   */
  async function current(kid?: string): Promise<void> {
    // A fetch under way brings the newest set there is: wait for it, whatever its outcome (the
    // checks below decide with what it left), instead of refusing the calls of a cold start,
    // or of a new kid's first moments, that arrive while it is in flight.
    if (inflight !== undefined) await inflight.catch(() => undefined);
    const t = now();
    // After a failed fetch (Tessera down or overloaded), tried again at most once per
    // FAILED_FETCH_GAP_MS, not on every call: meanwhile the last keys stay in use.
    const retry =
      fetchedAt >= lastAttempt || t - lastAttempt >= Math.min(FAILED_FETCH_GAP_MS, options.refetchGapMs);
    const stale = t - fetchedAt > options.maxAgeMs && retry;
    const unknown = kid !== undefined && !keys.has(kid) && t - lastAttempt >= options.refetchGapMs;
    if (stale || unknown) {
      try {
        await refresh();
      } catch (err) {
        // The last known keys stay good for tokens they signed; without any, nothing verifies.
        if (fetchedAt === Number.NEGATIVE_INFINITY)
          throw new TesseraAuthError("UNAVAILABLE", "Tessera's signing keys cannot be fetched", {
            retryAfterSeconds: 1,
            cause: err,
          });
      }
    }
    if (fetchedAt === Number.NEGATIVE_INFINITY)
      throw new TesseraAuthError("UNAVAILABLE", "Tessera's signing keys cannot be fetched", {
        retryAfterSeconds: 1,
      });
  }

  async function keyFor(kid: string): Promise<Key> {
    await current(kid);
    const key = keys.get(kid);
    if (!key) throw invalid("access token is signed by an unknown key");
    return key;
  }

  function checkTimes(claims: AccessTokenClaims): void {
    const t = now();
    // Over exactly at `exp` (RFC 7519 4.1.4): the expiry Tessera set is never lengthened.
    if (claims.exp * 1000 <= t) throw new TesseraAuthError("TOKEN_EXPIRED", "access token expired");
    if (claims.nbf !== undefined && claims.nbf * 1000 > t + skewMs)
      throw invalid("access token is not valid yet");
    if (claims.iat * 1000 > t + skewMs) throw invalid("access token is issued in the future");
  }

  async function verifyToken(token: string): Promise<AccessTokenClaims> {
    const hit = verified.get(token);
    if (hit) {
      checkTimes(hit.claims);
      return hit.claims;
    }
    if (token.length > MAX_TOKEN_LENGTH || !looksLikeJwt(token)) throw invalid("access token is malformed");
    const [h, p, s] = token.split(".") as [string, string, string];
    const header = decodeJson(h, "header");
    const alg = header.alg;
    if (typeof alg !== "string" || !(options.algorithms as readonly string[]).includes(alg))
      throw invalid("access token algorithm is not accepted");
    if (header.typ !== "at+jwt") throw invalid("not an access token (typ)");
    if (header.crit !== undefined) throw invalid("access token has critical header parameters");
    if (typeof header.kid !== "string" || header.kid.length === 0) throw invalid("access token names no key");
    const key = await keyFor(header.kid);
    if (key.alg !== alg) throw invalid("access token algorithm does not match its key");
    const signature = Buffer.from(s, "base64url");
    if (signature.length !== 64) throw invalid("access token signature is invalid");
    const input = Buffer.from(`${h}.${p}`, "ascii");
    const ok =
      alg === "EdDSA"
        ? verify(null, input, key.key, signature)
        : verify("sha256", input, { key: key.key, dsaEncoding: "ieee-p1363" }, signature);
    if (!ok) throw invalid("access token signature is invalid");
    const payload = decodeJson(p, "payload");
    if (payload.iss !== options.issuer) throw invalid("access token issuer is not accepted");
    const aud = payload.aud;
    if (!(aud === options.audience || (Array.isArray(aud) && aud.includes(options.audience))))
      throw invalid("access token audience is not accepted");
    if (
      typeof payload.sub !== "string" ||
      typeof payload.tid !== "string" ||
      typeof payload.scope !== "string" ||
      (payload.pk !== "user" && payload.pk !== "machine") ||
      typeof payload.exp !== "number" ||
      typeof payload.iat !== "number" ||
      (payload.nbf !== undefined && typeof payload.nbf !== "number") ||
      (payload.sid !== undefined && typeof payload.sid !== "string") ||
      (payload.jti !== undefined && typeof payload.jti !== "string") ||
      (payload.cnf !== undefined && (typeof payload.cnf !== "object" || payload.cnf === null))
    )
      throw invalid("access token lacks Tessera claims");
    const claims = payload as unknown as AccessTokenClaims;
    checkTimes(claims);
    if (verified.size >= MAX_VERIFIED) verified.delete(verified.keys().next().value as string);
    verified.set(token, { claims, kid: header.kid });
    return claims;
  }

  return {
    verify: verifyToken,
    async hasKeys() {
      await current();
      return keys.size > 0;
    },
    get fetches() {
      return fetches;
    },
    get keySet() {
      return keySet;
    },
  };
}
