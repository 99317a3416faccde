import { randomUUID, webcrypto } from "node:crypto";
import {
  type CryptoKey,
  calculateJwkThumbprint,
  exportJWK,
  generateKeyPair,
  importJWK,
  type JWK,
  type JWTHeaderParameters,
  type JWTPayload,
  errors as joseErrors,
  jwtVerify,
  SignJWT,
} from "jose";
import { LRUCache } from "lru-cache";
import { type Clock, systemClock } from "../clock.js";
import type { Config } from "../config.js";
import { TesseraError } from "../errors.js";
import { SigningKey } from "../storage/entities.js";
import type { Storage } from "../storage/orm.js";
import { type MasterKey, openPrivateJwk, sealPrivateJwk } from "./master-key.js";

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
  /** Override the configured lifetime (seconds). */
  ttlSeconds?: number;
}

interface VerifyKey {
  kid: string;
  alg: string;
  key: CryptoKey | Uint8Array;
  publicJwk?: JWK;
  /** Keys retired after this moment are not served or accepted any more. */
  acceptUntil: number;
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
  /** The public keys (empty for HS256). */
  jwks(): { keys: JWK[] };
  /** Generate a new signing key now; old keys keep verifying until their tokens expire. */
  rotate(): Promise<void>;
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
  /** The clock of `iat`/`exp` on issue and of every expiry check (tests pass a manual one). */
  clock?: Clock;
}

/**
 * Create the JWT service: HS256 when a secret is configured, otherwise an EdDSA or ES256
 * key pair generated on first start and stored in the database, rotated on schedule.
 */
export async function createJwtService(options: JwtServiceOptions): Promise<JwtService> {
  const { config, storage } = options;
  const maxTtl = Math.max(options.maxTokenTtlSeconds ?? 0, config.accessTokenTtl);
  const ttlCap = options.maxTokenTtlSeconds ?? Number.POSITIVE_INFINITY;
  const { masterKey } = options;
  const now = options.clock ?? systemClock;
  const keys = new Map<string, VerifyKey>();
  type SigningEntry = VerifyKey & { signKey: CryptoKey | Uint8Array };
  let signing: SigningEntry | undefined;
  const algorithms = config.secret ? ["HS256"] : [config.algorithm];

  if (config.secret) {
    // Imported once as a CryptoKey: ~2.5x cheaper per verify than a raw secret.
    const key = (await webcrypto.subtle.importKey(
      "raw",
      new TextEncoder().encode(config.secret),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    )) as CryptoKey;
    signing = { kid: "hs256", alg: "HS256", key, signKey: key, acceptUntil: Number.POSITIVE_INFINITY };
    keys.set(signing.kid, signing);
  }

  async function loadKeys(): Promise<void> {
    const em = storage.em.fork();
    const rows = await em.find(SigningKey, { alg: config.algorithm }, { orderBy: { createdAt: "desc" } });
    const at = now();
    // The current key (never retired), opened before anything changes: one sealed with
    // another master key (a misconfigured instance rotated) leaves the keys in use as they are.
    const newest = rows.find((row) => !row.retiredAt);
    const privateJwk = newest ? openPrivateJwk(masterKey, newest.kid, newest.privateJwk) : undefined;
    keys.clear();
    signing = undefined;
    for (const row of rows) {
      // The last token a retired key signed ends `maxTtl` after its retirement, exactly
      // (exp has no tolerance, see verify): no token needs the key after that.
      const acceptUntil = row.retiredAt ? row.retiredAt.getTime() + maxTtl * 1000 : Number.POSITIVE_INFINITY;
      if (acceptUntil < at) continue;
      const publicJwk = JSON.parse(row.publicJwk) as JWK;
      const key = (await importJWK(publicJwk, row.alg)) as CryptoKey;
      keys.set(row.kid, { kid: row.kid, alg: row.alg, key, publicJwk, acceptUntil });
    }
    if (newest && privateJwk !== undefined) {
      const signKey = (await importJWK(JSON.parse(privateJwk) as JWK, newest.alg)) as CryptoKey;
      signing = { ...keys.get(newest.kid)!, signKey };
    }
  }

  async function generateKey(): Promise<void> {
    const pair = await generateKeyPair(config.algorithm, { extractable: true });
    const publicJwk = await exportJWK(pair.publicKey);
    const privateJwk = await exportJWK(pair.privateKey);
    const kid = await calculateJwkThumbprint(publicJwk);
    Object.assign(publicJwk, { kid, alg: config.algorithm, use: "sig" });
    const em = storage.em.fork();
    await em.transactional(async (tx) => {
      const at = new Date(now());
      await tx.nativeUpdate(SigningKey, { retiredAt: null }, { retiredAt: at });
      tx.create(SigningKey, {
        kid,
        alg: config.algorithm,
        privateJwk: sealPrivateJwk(masterKey, kid, JSON.stringify(privateJwk)),
        publicJwk: JSON.stringify(publicJwk),
        createdAt: at,
        retiredAt: null,
      });
    });
    await loadKeys();
  }

  async function ensureFreshKey(): Promise<void> {
    await loadKeys();
    const row = signing ? await storage.em.fork().findOne(SigningKey, { kid: signing.kid }) : null;
    if (!row || now() - row.createdAt.getTime() > config.keyRotationInterval * 1000) await generateKey();
  }

  let timer: NodeJS.Timeout | undefined;
  let lastReload = 0;
  if (!config.secret) {
    await ensureFreshKey();
    // Check hourly whether the key is due for rotation (and drop keys past their use).
    timer = setInterval(() => {
      ensureFreshKey().catch(() => undefined);
    }, 3600_000);
    timer.unref();
  }

  // Verified tokens, so each token pays for signature verification once. Entries never
  // outlive the token: the expiry is re-checked on every hit.
  const verified = new LRUCache<string, AccessTokenClaims>({ max: 50_000 });
  // Tokens whose signature did not verify under a known key, so a replayed forgery is
  // refused without crypto again (HMAC or signature verification costs more than the
  // accepted, cached path). It can only refuse: a signature that fails under a key fails
  // forever under it, and a kid names one key (HS256: the configured secret; otherwise
  // the key's JWK thumbprint). Bounded by total size against floods of distinct forgeries.
  const forged = new LRUCache<string, true>({
    maxSize: 4 * 1024 * 1024,
    sizeCalculation: (_v, token) => token.length,
  });

  function verifiedClaims(token: string): AccessTokenClaims | undefined {
    const hit = verified.get(token);
    if (hit === undefined) return undefined;
    // Exactly at `exp` the token is over (RFC 7519 4.1.4: valid only *before* it).
    if (hit.exp * 1000 <= now()) {
      verified.delete(token);
      throw new TesseraError("TOKEN_EXPIRED", "access token expired");
    }
    return hit;
  }

  async function keyFor(header: JWTHeaderParameters): Promise<CryptoKey | Uint8Array> {
    const kid = header.kid ?? (config.secret ? "hs256" : undefined);
    let entry = kid ? keys.get(kid) : undefined;
    if (!entry && kid && !config.secret && now() - lastReload > 5_000) {
      // Another instance may have rotated: reload once, rate-limited against unknown-kid floods.
      lastReload = now();
      await loadKeys();
      entry = keys.get(kid);
    }
    if (!entry || entry.acceptUntil < now()) throw new TesseraError("TOKEN_INVALID", "unknown signing key");
    return entry.key;
  }

  return {
    algorithms,
    async issue(claims) {
      if (!signing) throw new TesseraError("UNAVAILABLE", "no signing key available");
      const iat = Math.floor(now() / 1000);
      const exp = iat + Math.min(claims.ttlSeconds ?? config.accessTokenTtl, ttlCap);
      const jti = randomUUID();
      const payload: Record<string, unknown> = {
        tid: claims.tenantId,
        scope: claims.scopes.join(" "),
        pk: claims.kind,
      };
      if (claims.username) payload.preferred_username = claims.username;
      if (claims.sessionId) payload.sid = claims.sessionId;
      if (claims.certificateThumbprint) payload.cnf = { "x5t#S256": claims.certificateThumbprint };
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
      const at = now();
      try {
        ({ payload } = await jwtVerify(token, keyFor, {
          algorithms: [...algorithms],
          issuer: config.issuer,
          audience: config.audience,
          typ: ACCESS_TOKEN_TYP,
          // jose applies its tolerance to exp, nbf and iat alike; exp is checked exactly below.
          clockTolerance: config.clockSkew,
          currentDate: new Date(at),
          requiredClaims: ["exp", "sub", "iat"],
        }));
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
      verified.set(token, claims);
      return claims;
    },
    isForged(token) {
      return forged.has(token);
    },
    jwks() {
      const out: JWK[] = [];
      for (const k of keys.values()) if (k.publicJwk && k.acceptUntil >= now()) out.push(k.publicJwk);
      return { keys: out };
    },
    async rotate() {
      if (!config.secret) await generateKey();
    },
    close() {
      if (timer) clearInterval(timer);
    },
  };
}
