// Access tokens: issuing them under the current signing key and verifying them (each token
// pays for its crypto once; replayed forgeries are refused without crypto).
import { randomUUID, webcrypto } from "node:crypto";
import {
  type CryptoKey,
  type JWK,
  type JWTHeaderParameters,
  type JWTPayload,
  errors as joseErrors,
  jwtVerify,
  SignJWT,
} from "jose";
import { LRUCache } from "lru-cache";
import type { Logger } from "pino";
import { type Clock, systemClock } from "../clock.js";
import type { Config } from "../config.js";
import { TesseraError } from "../errors.js";
import type { Storage } from "../storage/orm.js";
import { CERTIFICATE_TOKEN_CLAIMS } from "./certificate-token.js";
import type { MasterKey } from "./master-key.js";
import {
  keyPrePublicationSeconds,
  openSigningKeyRing,
  UNKNOWN_KID_REFETCH_GAP_MS,
  type VerifyKey,
} from "./signing-key-ring.js";

/** The JWT `typ` of access tokens (RFC 9068). Anything else is refused as an access token. */
export const ACCESS_TOKEN_TYP = "at+jwt";

/** Claims Tessera puts in an access token besides the registered ones. */
export interface AccessTokenClaims extends JWTPayload {
  sub: string;
  exp: number;
  /** Tenant id. */
  tid: string;
  /** Space-separated scopes (OAuth 2.0 `scope` claim) for offline checks via JWKS. */
  scope: string;
  /** Principal kind: "user" or "machine". */
  pk: "user" | "machine";
  preferred_username?: string;
  /**
   * Session id (a user's refresh-token family, OpenID Connect `sid`): the token is refused
   * once that session is revoked. Absent from machine tokens and from user tokens issued
   * before sessions were tracked.
   */
  sid?: string;
  /** RFC 8705 certificate binding. */
  cnf?: { "x5t#S256": string };
  // A machine token issued to a certificate alone also carries `amr` and `cert_san_uris`:
  // read them with grantingCertificateOf (certificate-token.ts), which checks their shape.
}

/** What to put in a new access token. */
export interface IssueAccessToken {
  subject: string;
  tenantId: string;
  scopes: readonly string[];
  kind: "user" | "machine";
  username?: string;
  /** The session (refresh-token family) the token belongs to: its `sid` claim. */
  sessionId?: string;
  /** base64url SHA-256 of the client certificate (RFC 8705 x5t#S256). */
  certificateThumbprint?: string;
  /** Its SAN URIs, when that certificate alone authenticated the machine user: marks the token (CERTIFICATE_TOKEN_CLAIMS). */
  certificateSanUris?: readonly string[];
  /** Override the configured lifetime (seconds). */
  ttlSeconds?: number;
  /** No later than this: `exp` is cut to it (a user session's absolute end). */
  expiresBy?: Date;
}

/** Counters of the key set, for tests and metrics. */
export interface JwtKeyStats {
  /** Keys published (and accepted) now. */
  keys: number;
  /** The kid signing now, if any. */
  signingKid: string | undefined;
  /** Reads of the key set from the database (polls, unknown-kid refetches, start). */
  refreshes: number;
  /** Reads that failed (database unreachable): the last known keys stay in use. */
  refreshFailures: number;
  /** Reads made because a token named a kid this instance did not know. */
  unknownKidRefetches: number;
  /** Keys this instance created. */
  keysCreated: number;
  /** Rotations this instance attempted and another instance won (its key was inserted first). */
  rotationsLost: number;
}

/** Signs and verifies access tokens; owns the signing keys and the JWKS. */
export interface JwtService {
  /** Algorithms accepted on verification (the allowlist). */
  readonly algorithms: readonly string[];
  issue(claims: IssueAccessToken): Promise<{ token: string; expiresAt: Date; jti: string }>;
  /**
   * Verify signature, algorithm, iss, aud, typ, exp and nbf/iat. `exp` is enforced
   * exactly: Tessera set it (every accepted token bears its issuer and a key of its own),
   * so it needs no tolerance, and a lifetime Tessera capped (a rotation's grace period)
   * must not outlive its end. The configured skew applies to nbf/iat only: a token minted
   * by an instance whose clock runs ahead is not refused as "not yet valid", and that
   * direction can never lengthen a token's life.
   * Verified tokens are cached until they expire, so a token pays for crypto once.
   * @throws TesseraError TOKEN_EXPIRED or TOKEN_INVALID
   */
  verify(token: string): Promise<AccessTokenClaims>;
  /**
   * The claims of `token` when it is already verified (cached) and not expired, else
   * undefined: what `verify` would answer without any work, synchronously.
   * @throws TesseraError TOKEN_EXPIRED
   */
  verifiedClaims(token: string): AccessTokenClaims | undefined;
  /** Whether `token`'s signature already failed to verify under a known key (`verify` refuses it with TOKEN_INVALID). */
  isForged(token: string): boolean;
  /**
   * Whether `token` is kept as verified (expired or not): a cache answer, no work. Such a
   * token is a JWT, with no test of its shape.
   */
  isVerified(token: string): boolean;
  /**
   * The public keys (empty for HS256): every key that signs, will sign (pre-published) or
   * signed tokens that may not have expired yet, newest first. Instances that have read the
   * same rows serve the same JSON.
   */
  jwks(): { keys: JWK[] };
  /**
   * Create the next signing key now, whatever the schedule: published at once, signing
   * after the pre-publication period, or at once with `immediate` (an emergency: other
   * instances then learn it from the first token naming it). Old keys keep verifying until
   * their tokens expire. When another instance created the next key at the same moment,
   * that key stands and is returned.
   */
  rotate(options?: { immediate?: boolean }): Promise<{ kid: string; activatesAt: Date } | undefined>;
  /** Read the key set from the database now, and create the next key if one is due. */
  refresh(): Promise<void>;
  /**
   * The stored keys changed (PostgreSQL: a notification of the `signing_keys` trigger):
   * read them with a read that starts after this call (one shared by every call meanwhile),
   * so a key another instance committed is known here at once rather than at the next poll.
   */
  keysChanged(): Promise<void>;
  stats(): JwtKeyStats;
  /** Stop background timers. */
  close(): void;
}

/** Options for {@link createJwtService}. */
export interface JwtServiceOptions {
  config: Config["auth"]["jwt"];
  storage: Storage;
  /**
   * Longest lifetime of any token this service signs (`auth.maxTokenTtl`): every `exp` is
   * capped to it, whatever lifetime is asked for; retired keys verify for as long.
   */
  maxTokenTtlSeconds?: number;
  /** Seals the private keys stored in the database (see master-key.ts). */
  masterKey: MasterKey;
  /** Master keys being rotated out: keys sealed with one are opened too (see SigningKeyRingOptions). */
  previousMasterKeys?: readonly MasterKey[];
  /** Where failures of the background refresh and rotations are reported. */
  logger?: Pick<Logger, "info" | "warn" | "error">;
  /** The clock of key schedules, `iat`/`exp` on issue and every expiry check (tests pass a manual one). */
  clock?: Clock;
  /** Period of the background refresh (default `config.keyRefreshMs`); 0: none (tests call `refresh`). */
  refreshIntervalMs?: number;
  /** Least time between two reads caused by unknown kids (default {@link UNKNOWN_KID_REFETCH_GAP_MS}). */
  unknownKidGapMs?: number;
}

/**
 * Create the JWT service: HS256 when a secret is configured, otherwise EdDSA or ES256 key
 * pairs stored in the database (private keys sealed with the master key) and shared by
 * every instance on it.
 *
 * Keys of several instances: each key has a generation (1, 2, 3…) and an activation time.
 * The signing key is the newest key whose activation has passed, so every instance that
 * has read the same rows signs with the same key. A rotation inserts generation n+1 with
 * activation = now + pre-publication: it is in every instance's JWKS (each re-reads the
 * rows every `keyRefreshMs`) before it signs anything. Instances rotating at the same moment
 * collide on the unique generation and one key results. A key retires when its successor
 * activates, and stays published and accepted for the longest token lifetime
 * after that.
 */
export async function createJwtService(options: JwtServiceOptions): Promise<JwtService> {
  const { config } = options;
  const now = options.clock ?? systemClock;
  const maxTtl = Math.max(options.maxTokenTtlSeconds ?? 0, config.accessTokenTtl);
  const ttlCap = options.maxTokenTtlSeconds ?? Number.POSITIVE_INFINITY;
  const algorithms = config.secret ? ["HS256"] : [config.algorithm];

  let secretKey: VerifyKey | undefined;
  if (config.secret) {
    // Imported once as a CryptoKey: ~2.5x cheaper per verify than a raw secret.
    const key = (await webcrypto.subtle.importKey(
      "raw",
      new TextEncoder().encode(config.secret),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    )) as CryptoKey;
    secretKey = {
      kid: "hs256",
      alg: "HS256",
      key,
      signKey: key,
      generation: 0,
      activatesAt: 0,
      retiresAt: Number.POSITIVE_INFINITY,
      acceptUntil: Number.POSITIVE_INFINITY,
    };
  }

  // Verified tokens, so each token pays for signature verification once. Entries never
  // outlive the token: the expiry is re-checked on every hit.
  // The kid is kept so that a key removed from the database takes its tokens with it.
  const verified = new LRUCache<string, { claims: AccessTokenClaims; kid: string }>({ max: 50_000 });
  // Tokens whose signature did not verify under a known key, so a replayed forgery is
  // refused without crypto again (HMAC or signature verification costs more than the
  // accepted, cached path). It can only refuse: a signature that fails under a key fails
  // forever under it, and a kid names one key (HS256: the configured secret; otherwise
  // the key's JWK thumbprint). Bounded by total size against floods of distinct forgeries.
  const forged = new LRUCache<string, true>({
    maxSize: 4 * 1024 * 1024,
    sizeCalculation: (_v, token) => token.length,
  });

  function forgetVerifiedUnder(kid: string): void {
    const stale: string[] = [];
    for (const [token, entry] of verified.entries()) if (entry.kid === kid) stale.push(token);
    for (const token of stale) verified.delete(token);
  }

  const keyRing = await openSigningKeyRing({
    config,
    storage: options.storage,
    masterKey: options.masterKey,
    previousMasterKeys: options.previousMasterKeys,
    logger: options.logger,
    clock: now,
    // The last token a retired key signed ends `maxTtl` after its retirement, exactly (exp has
    // no tolerance, see verify): no token needs the key after that.
    verifyWindowMs: maxTtl * 1000,
    refreshIntervalMs: options.refreshIntervalMs,
    unknownKidGapMs: options.unknownKidGapMs ?? UNKNOWN_KID_REFETCH_GAP_MS,
    secretKey,
    onKeyGone: forgetVerifiedUnder,
  });
  const prePublicationMs = keyPrePublicationSeconds(config) * 1000;

  function verifiedClaims(token: string): AccessTokenClaims | undefined {
    const hit = verified.get(token);
    if (hit === undefined) return undefined;
    // Exactly at `exp` the token is over (RFC 7519 4.1.4: valid only *before* it).
    if (hit.claims.exp * 1000 <= now()) {
      verified.delete(token);
      throw new TesseraError("TOKEN_EXPIRED", "access token expired");
    }
    return hit.claims;
  }

  async function keyFor(header: JWTHeaderParameters): Promise<VerifyKey> {
    const kid = header.kid ?? (config.secret ? "hs256" : undefined);
    const entry = kid ? await keyRing.find(kid) : undefined;
    if (!entry || entry.acceptUntil < now()) throw new TesseraError("TOKEN_INVALID", "unknown signing key");
    return entry;
  }

  // How long after its retirement a key may still have signed: instances switch keys at the
  // successor's activation, known an hour ahead, give or take their clocks' skew; an
  // immediate rotation reaches an instance within its refresh period.
  const signingAfterRetirementMs =
    config.clockSkew * 1000 + (options.refreshIntervalMs ?? config.keyRefreshMs);

  return {
    algorithms,
    async issue(claims) {
      const signing = keyRing.signingAt(now());
      if (!signing?.signKey) throw new TesseraError("UNAVAILABLE", "no signing key available");
      const iat = Math.floor(now() / 1000);
      const exp = Math.min(
        iat + Math.min(claims.ttlSeconds ?? config.accessTokenTtl, ttlCap),
        claims.expiresBy ? Math.floor(claims.expiresBy.getTime() / 1000) : Number.POSITIVE_INFINITY,
      );
      const jti = randomUUID();
      const payload: Record<string, unknown> = {
        tid: claims.tenantId,
        scope: claims.scopes.join(" "),
        pk: claims.kind,
      };
      if (claims.username) payload.preferred_username = claims.username;
      if (claims.sessionId) payload.sid = claims.sessionId;
      if (claims.certificateThumbprint) payload.cnf = { "x5t#S256": claims.certificateThumbprint };
      if (claims.certificateThumbprint && claims.certificateSanUris) {
        payload[CERTIFICATE_TOKEN_CLAIMS.amr] = [CERTIFICATE_TOKEN_CLAIMS.mtls];
        payload[CERTIFICATE_TOKEN_CLAIMS.sanUris] = [...claims.certificateSanUris];
      }
      const token = await new SignJWT(payload)
        .setProtectedHeader({ alg: signing.alg, kid: signing.kid, typ: ACCESS_TOKEN_TYP })
        .setIssuer(config.issuer)
        .setAudience(config.audience)
        .setSubject(claims.subject)
        .setIssuedAt(iat)
        .setNotBefore(iat)
        .setExpirationTime(exp)
        .setJti(jti)
        .sign(signing.signKey);
      return { token, expiresAt: new Date(exp * 1000), jti };
    },
    verifiedClaims,
    async verify(token) {
      const hit = verifiedClaims(token);
      if (hit) return hit;
      if (forged.has(token)) throw new TesseraError("TOKEN_INVALID", "access token is invalid");
      let payload: JWTPayload;
      let protectedHeader: JWTHeaderParameters;
      const at = now();
      let signer: VerifyKey | undefined;
      try {
        ({ payload, protectedHeader } = await jwtVerify(
          token,
          async (header) => {
            signer = await keyFor(header);
            return signer.key;
          },
          {
            algorithms: [...algorithms],
            issuer: config.issuer,
            audience: config.audience,
            typ: ACCESS_TOKEN_TYP,
            // jose applies its tolerance to exp, nbf and iat alike; exp is checked exactly below.
            clockTolerance: config.clockSkew,
            requiredClaims: ["exp", "sub", "iat"],
            currentDate: new Date(at),
          },
        ));
      } catch (err) {
        if (err instanceof TesseraError) throw err;
        if (err instanceof joseErrors.JWTExpired)
          throw new TesseraError("TOKEN_EXPIRED", "access token expired");
        if (err instanceof joseErrors.JWTClaimValidationFailed) {
          throw new TesseraError("TOKEN_INVALID", `access token claim check failed: ${err.claim}`);
        }
        if (err instanceof joseErrors.JWSSignatureVerificationFailed) forged.set(token, true);
        throw new TesseraError("TOKEN_INVALID", "access token is invalid");
      }
      if (
        typeof payload.tid !== "string" ||
        typeof payload.scope !== "string" ||
        (payload.pk !== "user" && payload.pk !== "machine") ||
        (payload.sid !== undefined && typeof payload.sid !== "string")
      ) {
        throw new TesseraError("TOKEN_INVALID", "access token lacks Tessera claims");
      }
      const claims = payload as AccessTokenClaims;
      // No tolerance on the expiry Tessera set: over exactly at `exp` (RFC 7519 4.1.4).
      if (claims.exp * 1000 <= at) throw new TesseraError("TOKEN_EXPIRED", "access token expired");
      // A retired key is published only so that the tokens it signed before its retirement
      // keep working: a token it claims to have signed later was minted with a leaked or
      // restored private key, not by Tessera.
      if (
        signer !== undefined &&
        (claims.iat ?? Number.POSITIVE_INFINITY) * 1000 > signer.retiresAt + signingAfterRetirementMs
      ) {
        throw new TesseraError("TOKEN_INVALID", "access token was signed after its key retired");
      }
      verified.set(token, { claims, kid: protectedHeader.kid ?? "hs256" });
      return claims;
    },
    isForged(token) {
      return forged.has(token);
    },
    isVerified(token) {
      return verified.has(token);
    },
    jwks() {
      const t = now();
      const out: JWK[] = [];
      for (const k of keyRing.ordered()) if (k.publicJwk && k.acceptUntil >= t) out.push(k.publicJwk);
      return { keys: out };
    },
    async rotate(rotateOptions = {}) {
      if (config.secret) return undefined;
      await keyRing.readKeys();
      const t = now();
      return keyRing.createKey(rotateOptions.immediate ? t : t + prePublicationMs);
    },
    refresh: keyRing.refresh,
    keysChanged: keyRing.keysChanged,
    stats: keyRing.stats,
    close: keyRing.close,
  };
}
