import { createHmac, hash, hkdfSync, randomBytes, timingSafeEqual } from "node:crypto";
import { LRUCache } from "lru-cache";
import type { TesseraError } from "../errors.js";
import { verifySecret } from "./password.js";

/**
 * Heap bytes counted per entry of the in-process cache (its 32-byte key string, the key
 * map's slot and lru-cache's per-entry arrays): the most bench/secret-cache-memory.ts
 * measured with `node --expose-gc` (131–155 bytes from 0.5M to 1M entries, the high end
 * right after the tables grow; bench/results/2026-12-05-working-set.md), rounded up. Every
 * entry has the same shape, so the memory bound is this times the entries held.
 */
export const SECRET_CACHE_ENTRY_BYTES = 160;

/** HKDF label of the shared-digest key: the master key is never used for two things as is. */
const SHARED_KEY_INFO = "tessera verified-secret digest v1";

/** The key of shared digests, derived from the master key (HKDF-SHA256, a label of its own). */
export function sharedDigestKey(masterKey: Buffer): Buffer {
  return Buffer.from(hkdfSync("sha256", masterKey, Buffer.alloc(0), SHARED_KEY_INFO, 32));
}

/**
 * The digest of a verified secret stored beside its credential row (`verified_digest`), as
 * one verification sees it. A digest is `HMAC(K, namespace ‖ stored hash ‖ secret)`: it
 * proves that someone holding K found `secret` to match this very hash of this very
 * credential, so a rotated hash, another credential or another secret never match it.
 */
export interface SharedDigest {
  /** The digest the row read brought (null: none). On PostgreSQL it may predate a newer one: see {@link fresh}. */
  stored: string | null;
  /**
   * The stored digest read now, past any cache: asked when `stored` is null, since the
   * state cache may hold the row from before another instance stored its digest (storing
   * one announces nothing, see Migration20261205010000_verified_digests).
   */
  fresh(): Promise<string | null>;
  /** Store the digest of a secret PBKDF2 just verified against the row's hash (not awaited by the request). */
  save(digest: string): Promise<void>;
}

/** Options of {@link VerifiedSecretCache}. */
export interface VerifiedSecretCacheOptions {
  /** Bytes of heap the in-process cache may hold (`auth.tokens.cacheMaxBytes`). */
  maxBytes: number;
  /** At most this many entries as well (`auth.tokens.cacheSize`; unset: the bytes alone decide). */
  maxEntries?: number | undefined;
  /** Key of shared digests ({@link sharedDigestKey}); without it none is read or stored. */
  sharedKey?: Buffer | undefined;
  /** Where a digest that could not be stored or read is reported (no secret, no digest in it). */
  logger?: { warn(obj: object, msg: string): void; info?(obj: object, msg: string): void } | undefined;
}

/** What the cache did since start (metrics, tests). */
export interface SecretCacheStats {
  /** Verifications answered by the in-process cache. */
  hits: number;
  /** Verifications it could not answer, answered by a shared digest or PBKDF2 (one refused hashing is not counted). */
  misses: number;
  /** Entries dropped to stay within the memory bound. */
  evictions: number;
  /** Misses answered by a digest another verification stored beside the credential (no PBKDF2). */
  sharedHits: number;
  /** Digests stored after a PBKDF2 verified a secret. */
  sharedWrites: number;
  /** Digests that could not be stored (database gone): the next miss hashes again. */
  sharedWriteFailures: number;
  /** Stored digests that could not be read (database gone, a timeout): those misses were answered by PBKDF2. */
  sharedReadFailures: number;
  /** Entries held now. */
  entries: number;
  /** Heap bytes they take (entries × {@link SECRET_CACHE_ENTRY_BYTES}). */
  bytes: number;
  /** The bound. */
  maxBytes: number;
}

/**
 * Remembers which presented secrets matched which stored PBKDF2 hash, so a credential
 * pays the PBKDF2 cost (slow by design) once and is recognised again for the price of a hash.
 *
 * Two levels:
 * - in process, an LRU bounded by memory: each entry is only a 32-byte key, SHA-256 of the
 *   namespace, the stored hash and the secret behind a per-process random 256-bit key (a
 *   keyed prefix hash, not HMAC: the digest never leaves the process, so length extension
 *   gives nothing, and the one-shot `crypto.hash` costs a fraction of an Hmac object). The
 *   stored hash is inside the key, so rotating or changing the secret invalidates it;
 * - shared, for a credential row that carries a {@link SharedDigest}: after PBKDF2 verified
 *   a secret, `HMAC(K, …)` is stored beside the row, and a miss anywhere (another instance,
 *   a restart, an evicted entry) checks the presented secret with one HMAC against it. K
 *   derives from the master key, which is in the instances' configuration only: a dump of
 *   the database cannot test guesses offline. Only generated, high-entropy secrets (tokens,
 *   machine credentials) get one; a human password does not (see user-principal.ts).
 *
 * Neither level decides anything but "this secret matches this hash": the caller reads
 * the row's state (revoked, expired, disabled) on every request. Concurrent first uses of
 * one secret share a single PBKDF2 run.
 */
export class VerifiedSecretCache {
  private readonly key = randomBytes(32).toString("base64");
  private readonly cache: LRUCache<string, true>;
  private readonly inflight = new Map<string, Promise<boolean>>();
  private readonly sharedKey: Buffer | undefined;
  private readonly logger: VerifiedSecretCacheOptions["logger"];
  private readonly counters = {
    hits: 0,
    misses: 0,
    evictions: 0,
    sharedHits: 0,
    sharedWrites: 0,
    sharedWriteFailures: 0,
    sharedReadFailures: 0,
  };
  /** Whether the last read of a stored digest failed: its failure was logged, the next success is too. */
  private readFailing = false;
  /** Whether the last store of a digest failed (logged once per run of failures, like reads). */
  private writeFailing = false;

  constructor(options: VerifiedSecretCacheOptions) {
    const maxSize = Math.max(SECRET_CACHE_ENTRY_BYTES, Math.floor(options.maxBytes));
    this.cache = new LRUCache<string, true>({
      maxSize,
      sizeCalculation: () => SECRET_CACHE_ENTRY_BYTES,
      ...(options.maxEntries ? { max: options.maxEntries } : {}),
      dispose: (_value, _key, reason) => {
        if (reason === "evict") this.counters.evictions++;
      },
    });
    this.sharedKey = options.sharedKey;
    this.logger = options.logger;
  }

  /** The in-process key of a secret verified against `storedHash` within a namespace (e.g. "token:<id>"). */
  private keyOf(namespace: string, storedHash: string, secret: string): string {
    // "binary" (latin1): the 32 digest bytes as a 32-character one-byte string, the smallest key a Map takes.
    return hash("sha256", `${this.key}\0${namespace}\0${storedHash}\0${secret}`, "binary");
  }

  /**
   * The shared digest of `secret` verified against `storedHash` for credential `namespace`
   * (base64url, 43 characters), or undefined without a shared key. The fields cannot run
   * into each other: neither a namespace nor a stored hash holds a NUL, and the secret is last.
   */
  sharedDigestOf(namespace: string, storedHash: string, secret: string): string | undefined {
    if (this.sharedKey === undefined) return undefined;
    return createHmac("sha256", this.sharedKey)
      .update(`v1\0${namespace}\0${storedHash}\0${secret}`)
      .digest("base64url");
  }

  /** Whether a stored digest is the one of this secret (constant time). */
  private matches(stored: string | null, expected: string | undefined): boolean {
    if (stored === null || expected === undefined || stored.length !== expected.length) return false;
    return timingSafeEqual(Buffer.from(stored), Buffer.from(expected));
  }

  /**
   * Whether `secret` is known to match `storedHash` (verified before here, or by whoever
   * stored the row's digest `shared`, if given): the synchronous half of {@link verify},
   * for a caller that must decide without awaiting. False says only "not known", never "wrong".
   */
  knows(namespace: string, secret: string, storedHash: string, shared?: string | null): boolean {
    const k = this.keyOf(namespace, storedHash, secret);
    if (this.cache.get(k) !== undefined) {
      this.counters.hits++;
      return true;
    }
    if (shared && this.matches(shared, this.sharedDigestOf(namespace, storedHash, secret))) {
      this.counters.misses++;
      this.counters.sharedHits++;
      this.cache.set(k, true);
      return true;
    }
    return false;
  }

  /**
   * Whether `secret` matches `storedHash`: the in-process cache, then the shared digest
   * (one HMAC), and PBKDF2 (off the event loop) only when neither knows it. A refusal is
   * always PBKDF2's: a digest that does not match proves nothing (it may be another
   * master key's, or an older hash's). `forbidden`: set where hashing is refused (admission's
   * first, budget-free attempt, `RequestState.hashingRefused`): thrown instead of starting PBKDF2.
   */
  async verify(
    namespace: string,
    secret: string,
    storedHash: string,
    shared?: SharedDigest,
    forbidden?: TesseraError,
  ): Promise<boolean> {
    const k = this.keyOf(namespace, storedHash, secret);
    if (this.cache.get(k) !== undefined) {
      this.counters.hits++;
      return true;
    }
    const digest = shared ? this.sharedDigestOf(namespace, storedHash, secret) : undefined;
    if (shared && digest !== undefined) {
      const stored = shared.stored ?? (await this.readFresh(shared));
      if (this.matches(stored, digest)) {
        this.counters.misses++;
        this.counters.sharedHits++;
        this.cache.set(k, true);
        return true;
      }
    }
    let pending = this.inflight.get(k);
    if (!pending) {
      // Where hashing is refused no flight is started: others joining it would get that
      // refusal instead of a verdict.
      if (forbidden !== undefined) throw forbidden;
      pending = verifySecret(secret, storedHash).finally(() => this.inflight.delete(k));
      this.inflight.set(k, pending);
      // The flight's leader stores the digest, once.
      if (shared && digest !== undefined)
        pending.then(
          (ok) => {
            if (ok) this.store(shared, digest);
          },
          () => undefined,
        );
    }
    // Counted here, not on entry: a check refused hashing (admission's first, budget-free
    // attempt) comes back once its budget is reserved, and is one miss, not two.
    this.counters.misses++;
    const ok = await pending;
    if (ok) this.cache.set(k, true);
    return ok;
  }

  /**
   * As {@link verify} without a shared digest, but a miss is this call's own PBKDF2: it
   * neither joins nor leads a verification in flight. For guessable secrets (human
   * passwords), whose unknown and disabled accounts cost every guess a PBKDF2 of its own:
   * a wrong guess answered from another address's PBKDF2 would be faster, and free of the
   * budgets that address reserved, only where the account exists. (Concurrent identical
   * guesses from one address share one verification before they get here: admission's.)
   */
  async verifyOwn(namespace: string, secret: string, storedHash: string, forbidden?: TesseraError) {
    const k = this.keyOf(namespace, storedHash, secret);
    if (this.cache.get(k) !== undefined) {
      this.counters.hits++;
      return true;
    }
    if (forbidden !== undefined) throw forbidden;
    this.counters.misses++;
    const ok = await verifySecret(secret, storedHash);
    if (ok) this.cache.set(k, true);
    return ok;
  }

  /**
   * Remember `secret` as matching `storedHash`, a hash just made of it here (a password's
   * upgrade to the current iterations, auth/password-upgrade.ts): by construction it matches.
   */
  remember(namespace: string, secret: string, storedHash: string): void {
    this.cache.set(this.keyOf(namespace, storedHash, secret), true);
  }

  /**
   * The stored digest read now, or null when it cannot be read: the digest only spares
   * PBKDF2, and the row of record (the stored hash, just read) can still decide, so a failed
   * read costs a PBKDF2, never the request. Counted, and logged once per run of failures.
   */
  private async readFresh(shared: SharedDigest): Promise<string | null> {
    try {
      const found = await shared.fresh();
      if (this.readFailing) {
        this.readFailing = false;
        this.logger?.info?.({}, "verified-secret digests readable again");
      }
      return found;
    } catch (err) {
      this.counters.sharedReadFailures++;
      if (!this.readFailing) {
        this.readFailing = true;
        this.logger?.warn(
          { err: err instanceof Error ? err.name : "error" },
          "verified-secret digest not readable; verifying with PBKDF2 until it is",
        );
      }
      return null;
    }
  }

  /** Store a digest without holding up the request; a failure is counted and logged (once per run), never thrown. */
  private store(shared: SharedDigest, digest: string): void {
    shared.save(digest).then(
      () => {
        this.counters.sharedWrites++;
        if (this.writeFailing) {
          this.writeFailing = false;
          this.logger?.info?.({}, "verified-secret digests stored again");
        }
      },
      (err: unknown) => {
        this.counters.sharedWriteFailures++;
        // Once per run of failures: an outage fails every store, and each is counted.
        if (this.writeFailing) return;
        this.writeFailing = true;
        this.logger?.warn(
          { err: err instanceof Error ? err.name : "error" },
          "verified-secret digest not stored; the credential's next miss hashes again",
        );
      },
    );
  }

  stats(): SecretCacheStats {
    return {
      ...this.counters,
      entries: this.cache.size,
      bytes: this.cache.calculatedSize,
      maxBytes: this.cache.maxSize,
    };
  }

  /** Forget everything held in process (tests, key compromise drills); shared digests stay. */
  clear(): void {
    this.cache.clear();
  }
}
