import { randomUUID, webcrypto } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { UniqueConstraintViolationException } from "@mikro-orm/core";
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
import type { Logger } from "pino";
import { type Clock, systemClock } from "../clock.js";
import type { Config } from "../config.js";
import { TesseraError } from "../errors.js";
import { SigningKey } from "../storage/entities.js";
import { loggableError } from "../storage/errors.js";
import type { Storage } from "../storage/orm.js";
import { readSigningKeys } from "../storage/repositories/signing-keys.js";
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

/** A key this instance knows: published (in the JWKS) and accepted on verification. */
interface VerifyKey {
  kid: string;
  alg: string;
  key: CryptoKey | Uint8Array;
  publicJwk?: JWK;
  /** Creation order (1, 2, 3…); 0 for the HS256 secret. */
  generation: number;
  /** When it starts signing (ms since epoch); published before. */
  activatesAt: number;
  /** When it stops signing: its successor's activation (ms); infinite while it has none. */
  retiresAt: number;
  /** Keys retired after this moment are not served or accepted any more. */
  acceptUntil: number;
  /** The private key, opened while the key signs or will. */
  signKey?: CryptoKey | Uint8Array;
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
  /** Where failures of the background refresh and rotations are reported. */
  logger?: Pick<Logger, "info" | "warn" | "error">;
  /** The clock of key schedules, `iat`/`exp` on issue and every expiry check (tests pass a manual one). */
  clock?: Clock;
  /** Period of the background refresh (default `config.keyRefreshMs`); 0: none (tests call `refresh`). */
  refreshIntervalMs?: number;
  /** Least time between two reads caused by unknown kids (default {@link UNKNOWN_KID_REFETCH_GAP_MS}). */
  unknownKidGapMs?: number;
}

/** Pre-publication when `auth.jwt.keyPrePublication` is unset (capped at half the rotation interval). */
export const DEFAULT_KEY_PRE_PUBLICATION = 3600;

/**
 * At most one read of the key set per this many ms is caused by tokens naming unknown
 * kids, however many arrive: forged kids cannot make an instance query per request.
 */
export const UNKNOWN_KID_REFETCH_GAP_MS = 250;

/** The pre-publication period (seconds) a configuration asks for. */
export function keyPrePublicationSeconds(config: Config["auth"]["jwt"]): number {
  return (
    config.keyPrePublication ??
    Math.min(DEFAULT_KEY_PRE_PUBLICATION, Math.floor(config.keyRotationInterval / 2))
  );
}

/** A kid as Tessera makes them (a base64url SHA-256 JWK thumbprint): anything else is not worth a query. */
const KID_SHAPE = /^[A-Za-z0-9_-]{43}$/;

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
  const { config, storage } = options;
  const now = options.clock ?? systemClock;
  const log = options.logger;
  const maxTtl = Math.max(options.maxTokenTtlSeconds ?? 0, config.accessTokenTtl);
  const ttlCap = options.maxTokenTtlSeconds ?? Number.POSITIVE_INFINITY;
  // The last token a retired key signed ends `maxTtl` after its retirement, exactly (exp has
  // no tolerance, see verify): no token needs the key after that.
  const verifyWindowMs = maxTtl * 1000;
  const intervalMs = config.keyRotationInterval * 1000;
  const prePublicationMs = keyPrePublicationSeconds(config) * 1000;
  const unknownKidGapMs = options.unknownKidGapMs ?? UNKNOWN_KID_REFETCH_GAP_MS;
  const { masterKey } = options;
  // Keys by kid, and the same newest generation first (the JWKS order, the signing choice).
  let keys = new Map<string, VerifyKey>();
  let ring: VerifyKey[] = [];
  // The highest generation of any row, any algorithm: the next key is one more.
  let topGeneration = 0;
  const algorithms = config.secret ? ["HS256"] : [config.algorithm];
  const stats = {
    refreshes: 0,
    refreshFailures: 0,
    unknownKidRefetches: 0,
    keysCreated: 0,
    rotationsLost: 0,
  };

  if (config.secret) {
    // Imported once as a CryptoKey: ~2.5x cheaper per verify than a raw secret.
    const key = (await webcrypto.subtle.importKey(
      "raw",
      new TextEncoder().encode(config.secret),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    )) as CryptoKey;
    const hs: VerifyKey = {
      kid: "hs256",
      alg: "HS256",
      key,
      signKey: key,
      generation: 0,
      activatesAt: 0,
      retiresAt: Number.POSITIVE_INFINITY,
      acceptUntil: Number.POSITIVE_INFINITY,
    };
    keys.set(hs.kid, hs);
    ring = [hs];
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

  // Imported keys by kid, so a re-read of unchanged rows costs no crypto. The stored text
  // is part of the key: a row whose content changed is imported again.
  const imported = new Map<string, { publicText: string; key: CryptoKey; publicJwk: JWK }>();
  const opened = new Map<string, { sealed: string; key: CryptoKey }>();
  const unopenable = new Set<string>();
  let loadedOnce = false;

  // Reads are numbered as they start: one that finishes after a later-started one has read an
  // older snapshot and is dropped (rotate() and createKey() read outside refresh()'s queue).
  let readsStarted = 0;
  let readApplied = 0;

  /** Read every key row and make it the key set: one query. */
  async function readKeys(): Promise<void> {
    stats.refreshes++;
    const seq = ++readsStarted;
    const rows = await readSigningKeys(storage);
    const t = now();
    const next = new Map<string, VerifyKey>();
    let top = 0;
    for (const row of rows) top = Math.max(top, row.generation ?? 0);
    for (const row of rows) {
      if (row.alg !== config.algorithm) continue;
      const retiresAt = row.retiredAt ? row.retiredAt.getTime() : Number.POSITIVE_INFINITY;
      const acceptUntil = retiresAt + verifyWindowMs;
      if (acceptUntil < t) continue;
      let pub = imported.get(row.kid);
      if (pub?.publicText !== row.publicJwk) {
        const publicJwk = JSON.parse(row.publicJwk) as JWK;
        pub = {
          publicText: row.publicJwk,
          publicJwk,
          key: (await importJWK(publicJwk, row.alg)) as CryptoKey,
        };
        imported.set(row.kid, pub);
      }
      const entry: VerifyKey = {
        kid: row.kid,
        alg: row.alg,
        key: pub.key,
        publicJwk: pub.publicJwk,
        generation: row.generation ?? 0,
        activatesAt: (row.activatesAt ?? row.createdAt).getTime(),
        retiresAt,
        acceptUntil,
      };
      if (retiresAt > t) {
        // Opened ahead of its activation, so the instance signs with it on time.
        let priv = opened.get(row.kid);
        if (priv?.sealed !== row.privateJwk) {
          try {
            const jwk = JSON.parse(openPrivateJwk(masterKey, row.kid, row.privateJwk)) as JWK;
            priv = { sealed: row.privateJwk, key: (await importJWK(jwk, row.alg)) as CryptoKey };
            opened.set(row.kid, priv);
            unopenable.delete(row.kid);
          } catch (err) {
            // Sealed with another master key (a misconfigured instance rotated): this
            // instance cannot sign with it, and says so once; it still verifies with it.
            priv = undefined;
            if (!unopenable.has(row.kid)) {
              unopenable.add(row.kid);
              log?.error({ kid: row.kid, err: (err as Error).message }, "signing key cannot be opened");
            }
          }
        }
        if (priv) entry.signKey = priv.key;
      }
      next.set(row.kid, entry);
    }
    if (seq < readApplied) return;
    readApplied = seq;
    // A key that disappeared (deleted by an operator, or past its window): tokens verified
    // under it are not answered from the cache any more.
    // Keys another instance created (or this one): said once per instance, with when it
    // learned it, which is what the propagation bound is about.
    if (loadedOnce)
      for (const k of next.values())
        if (!keys.has(k.kid))
          log?.info(
            { kid: k.kid, generation: k.generation, activatesAt: new Date(k.activatesAt).toISOString() },
            "signing key read",
          );
    loadedOnce = true;
    for (const kid of keys.keys()) if (!next.has(kid)) forgetVerifiedUnder(kid);
    for (const kid of imported.keys()) if (!next.has(kid)) imported.delete(kid);
    for (const kid of opened.keys()) if (!next.get(kid)?.signKey) opened.delete(kid);
    keys = next;
    ring = [...next.values()].sort((a, b) => b.generation - a.generation || (a.kid < b.kid ? -1 : 1));
    topGeneration = top;
  }

  /** The key that signs at `t`: the newest one activated by then. */
  function signingAt(t: number): VerifyKey | undefined {
    for (const k of ring) if (k.activatesAt <= t) return k;
    return undefined;
  }

  /**
   * Insert generation `topGeneration + 1` and retire its predecessors at its activation, in
   * one transaction. The unique generation makes this the conditional insert that lets one
   * instance win when several rotate at once; the losers read the winner's key.
   */
  async function createKey(activatesAt: number): Promise<{ kid: string; activatesAt: Date } | undefined> {
    const pair = await generateKeyPair(config.algorithm, { extractable: true });
    const publicJwk = await exportJWK(pair.publicKey);
    const privateJwk = await exportJWK(pair.privateKey);
    const kid = await calculateJwkThumbprint(publicJwk);
    Object.assign(publicJwk, { kid, alg: config.algorithm, use: "sig" });
    const generation = topGeneration + 1;
    const created = new Date(now());
    const activation = new Date(activatesAt);
    try {
      await storage.em.fork().transactional(async (tx) => {
        await tx.insert(SigningKey, {
          kid,
          alg: config.algorithm,
          privateJwk: sealPrivateJwk(masterKey, kid, JSON.stringify(privateJwk)),
          publicJwk: JSON.stringify(publicJwk),
          createdAt: created,
          activatesAt: activation,
          retiredAt: null,
          generation,
        });
        await tx.nativeUpdate(SigningKey, { retiredAt: null, kid: { $ne: kid } }, { retiredAt: activation });
        // Rows no token can need any more: their private keys are destroyed.
        await tx.nativeDelete(SigningKey, {
          retiredAt: { $lt: new Date(created.getTime() - verifyWindowMs) },
        });
      });
    } catch (err) {
      if (!(err instanceof UniqueConstraintViolationException)) throw err;
      stats.rotationsLost++;
      await readKeys();
      const winner = ring[0];
      return winner && { kid: winner.kid, activatesAt: new Date(winner.activatesAt) };
    }
    stats.keysCreated++;
    log?.info({ kid, generation, activatesAt: activation.toISOString() }, "signing key created");
    await readKeys();
    return { kid, activatesAt: activation };
  }

  /**
   * Create the next key when the schedule says so: the newest key has signed (or will have,
   * by the time its successor activates) for the rotation interval. Read from the stored
   * times, so a restart does not rotate early and every instance agrees on the moment.
   */
  async function rotateIfDue(): Promise<void> {
    const newest = ring[0];
    const t = now();
    if (!newest) {
      // No key of this algorithm (first start, or the algorithm changed): one is needed now.
      await createKey(t);
      return;
    }
    if (t >= newest.activatesAt + intervalMs - prePublicationMs)
      await createKey(Math.max(t + prePublicationMs, newest.activatesAt + intervalMs));
  }

  // One read at a time; callers arriving meanwhile share it.
  let inflight: Promise<void> | undefined;
  let lastReadStart = Number.NEGATIVE_INFINITY;
  let failing = false;
  function refresh(): Promise<void> {
    inflight ??= (async () => {
      lastReadStart = now();
      try {
        await readKeys();
        if (!config.secret) await rotateIfDue();
        if (failing) log?.info("signing keys readable again");
        failing = false;
      } catch (err) {
        stats.refreshFailures++;
        // The last known keys stay in use: they are valid until their stored retirement.
        if (!failing)
          log?.warn({ err: loggableError(err) }, "cannot read the signing keys; using the last known");
        failing = true;
        throw err;
      } finally {
        inflight = undefined;
      }
    })();
    return inflight;
  }

  // The next read caused by unknown kids; every token arriving before it starts shares it.
  let unknownKidRead: Promise<void> | undefined;
  /**
   * Read the key set once more for a token naming an unknown kid: a read that starts after
   * the token arrived (so a key committed before then is found), at most one per
   * `unknownKidGapMs`, shared by every token waiting for it.
   */
  function refetchForUnknownKid(): Promise<void> {
    unknownKidRead ??= (async () => {
      try {
        await inflight?.catch(() => undefined);
        const wait = lastReadStart + unknownKidGapMs - now();
        if (wait > 0) await sleep(wait);
      } finally {
        unknownKidRead = undefined;
      }
      stats.unknownKidRefetches++;
      await refresh();
    })();
    return unknownKidRead;
  }

  // The read a change notification asked for; notifications arriving before it starts share it.
  let changedRead: Promise<void> | undefined;
  function keysChanged(): Promise<void> {
    if (config.secret) return Promise.resolve();
    changedRead ??= (async () => {
      try {
        // A read already under way may have started before the change committed.
        await inflight?.catch(() => undefined);
      } finally {
        changedRead = undefined;
      }
      await refresh();
    })();
    return changedRead;
  }

  let timer: NodeJS.Timeout | undefined;
  if (!config.secret) {
    // Start-up: read (and create the first key, or the next one when due) before serving.
    await refresh();
    // Polling: one small query per period whatever the load. On PostgreSQL a change is
    // also announced (keysChanged, from the state channel's listener): the poll is then the
    // fallback while the listener reconnects, and what runs the rotation schedule.
    const period = options.refreshIntervalMs ?? config.keyRefreshMs;
    if (period > 0) {
      timer = setInterval(() => {
        refresh().catch(() => undefined);
      }, period);
      timer.unref();
    }
  }

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
    let entry = kid ? keys.get(kid) : undefined;
    if (!entry && kid && !config.secret && KID_SHAPE.test(kid)) {
      // Another instance may have created a key this one has not read yet (the poll
      // bounds that to keyRefreshMs; an immediate rotation is not pre-published at all).
      await refetchForUnknownKid().catch(() => undefined);
      entry = keys.get(kid);
    }
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
      const signing = signingAt(now());
      if (!signing?.signKey) throw new TesseraError("UNAVAILABLE", "no signing key available");
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
    jwks() {
      const t = now();
      const out: JWK[] = [];
      for (const k of ring) if (k.publicJwk && k.acceptUntil >= t) out.push(k.publicJwk);
      return { keys: out };
    },
    async rotate(rotateOptions = {}) {
      if (config.secret) return undefined;
      await readKeys();
      const t = now();
      return createKey(rotateOptions.immediate ? t : t + prePublicationMs);
    },
    refresh,
    keysChanged,
    stats() {
      return { ...stats, keys: keys.size, signingKid: signingAt(now())?.kid };
    },
    close() {
      if (timer) clearInterval(timer);
    },
  };
}
