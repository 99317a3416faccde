// The signing keys shared by every instance on one database: read, published, rotated on a
// schedule (one instance wins each rotation) and retired once no token can need them.
import { setTimeout as sleep } from "node:timers/promises";
import { UniqueConstraintViolationException } from "@mikro-orm/core";
import {
  type CryptoKey,
  calculateJwkThumbprint,
  exportJWK,
  generateKeyPair,
  importJWK,
  type JWK,
} from "jose";
import type { Logger } from "pino";
import type { Clock } from "../clock.js";
import type { Config } from "../config.js";
import { TesseraError } from "../errors.js";
import { SigningKey } from "../storage/entities.js";
import { isOutage, loggableError } from "../storage/errors.js";
import type { Storage } from "../storage/orm.js";
import { readSigningKeys } from "../storage/repositories/signing-keys.js";
import type { JwtKeyStats } from "./jwt.js";
import { type MasterKey, sealForFleet } from "./master-key.js";
import { createPrivateKeyOpener } from "./private-signing-keys.js";

/** A key this instance knows: published (in the JWKS) and accepted on verification. */
export interface VerifyKey {
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

/** What {@link openSigningKeyRing} needs. */
export interface SigningKeyRingOptions {
  config: Config["auth"]["jwt"];
  storage: Storage;
  masterKey: MasterKey;
  /** Master keys being rotated out: opens a key an instance still on one created meanwhile. */
  previousMasterKeys?: readonly MasterKey[] | undefined;
  logger?: Pick<Logger, "info" | "warn" | "error"> | undefined;
  clock: Clock;
  /** How long after its retirement a key is still published and accepted (ms). */
  verifyWindowMs: number;
  /** Period of the background refresh (default `config.keyRefreshMs`); 0: none. */
  refreshIntervalMs?: number | undefined;
  /** Least time between two reads caused by unknown kids. */
  unknownKidGapMs: number;
  /** The HS256 key (a configured secret): the ring holds it alone and reads no rows at start. */
  secretKey?: VerifyKey | undefined;
  /** A key left the set: what was verified under it must be forgotten. */
  onKeyGone(kid: string): void;
}

/** The key set of this instance, kept in step with the stored rows. */
export interface SigningKeyRing {
  /** The known key `kid`, reading the rows once more first when it is unknown but shaped like Tessera's. */
  find(kid: string): Promise<VerifyKey | undefined>;
  /** The key that signs at `t`: the newest one activated by then. */
  signingAt(t: number): VerifyKey | undefined;
  /** Every known key, newest generation first (the JWKS order). */
  ordered(): readonly VerifyKey[];
  /** Read every key row and make it the key set: one query. */
  readKeys(): Promise<void>;
  /** Insert the next generation, activating at `activatesAt` (or read the key that won). */
  createKey(activatesAt: number): Promise<{ kid: string; activatesAt: Date } | undefined>;
  refresh(): Promise<void>;
  keysChanged(): Promise<void>;
  stats(): JwtKeyStats;
  close(): void;
}

/**
 * Open the key ring: with no secret, read the rows (creating the first key, or the next one
 * when due) before serving, then poll every refresh period.
 */
export async function openSigningKeyRing(options: SigningKeyRingOptions): Promise<SigningKeyRing> {
  const { config, storage, masterKey, verifyWindowMs, unknownKidGapMs, previousMasterKeys } = options;
  const now = options.clock;
  const log = options.logger;
  const intervalMs = config.keyRotationInterval * 1000;
  const prePublicationMs = keyPrePublicationSeconds(config) * 1000;
  // Keys by kid, and the same newest generation first (the JWKS order, the signing choice).
  let keys = new Map<string, VerifyKey>();
  let ring: VerifyKey[] = [];
  if (options.secretKey) {
    keys.set(options.secretKey.kid, options.secretKey);
    ring = [options.secretKey];
  }
  // The highest generation of any row, any algorithm: the next key is one more.
  let topGeneration = 0;
  const stats = {
    refreshes: 0,
    refreshFailures: 0,
    unknownKidRefetches: 0,
    keysCreated: 0,
    rotationsLost: 0,
  };
  const forgetVerifiedUnder = options.onKeyGone;

  // Imported keys by kid, so a re-read of unchanged rows costs no crypto. The stored text
  // is part of the key: a row whose content changed is imported again.
  const imported = new Map<string, { publicText: string; key: CryptoKey; publicJwk: JWK }>();
  const privateKeys = createPrivateKeyOpener({ storage, masterKey, previousMasterKeys, logger: log });
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
    await privateKeys.reseal(rows);
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
        const signKey = await privateKeys.open(row);
        if (signKey) entry.signKey = signKey;
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
    privateKeys.keepOnly(new Set([...next.values()].filter((k) => k.signKey).map((k) => k.kid)));
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
          privateJwk: sealForFleet(masterKey, previousMasterKeys ?? [], kid, JSON.stringify(privateJwk)),
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

  return {
    async find(kid) {
      let entry = keys.get(kid);
      if (!entry && !config.secret && KID_SHAPE.test(kid)) {
        // Another instance may have created a key this one has not read yet (the poll
        // bounds that to keyRefreshMs; an immediate rotation is not pre-published at all).
        // When the rows cannot be read, whether the key exists is not known here: a fault
        // to retry (the token may well be good), not a verdict on the token.
        try {
          await refetchForUnknownKid();
        } catch (err) {
          if (isOutage(err))
            throw new TesseraError("UNAVAILABLE", "signing keys cannot be read", {
              headers: { "retry-after": "1" },
            });
        }
        entry = keys.get(kid);
      }
      return entry;
    },
    signingAt,
    ordered: () => ring,
    readKeys,
    createKey,
    refresh,
    keysChanged,
    stats: () => ({ ...stats, keys: keys.size, signingKid: signingAt(now())?.kid }),
    close() {
      if (timer) clearInterval(timer);
    },
  };
}
