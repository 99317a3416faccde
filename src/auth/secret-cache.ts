import { hash, randomBytes } from "node:crypto";
import { LRUCache } from "lru-cache";
import { hashingForbidden } from "./hash-pool.js";
import { verifySecret } from "./password.js";

/**
 * Remembers which presented secrets matched which stored PBKDF2 hash, so a credential
 * pays the ~200 ms PBKDF2 cost once and is recognised again for the price of an HMAC.
 *
 * Keys are SHA-256 of the presented secret behind a per-process random 256-bit key: the
 * cache holds nothing that could be replayed or brute-forced offline. (A keyed prefix hash,
 * not HMAC: the digest never leaves the process, so length extension gives nothing, and
 * the one-shot `crypto.hash` costs a fraction of building an Hmac object per request.) A hit counts only when
 * the stored hash is still the one it matched, so rotating or changing the secret
 * invalidates it; the caller still reads the row's state (revoked, expired, disabled) on
 * every request. Concurrent first uses of one secret share a single PBKDF2 run.
 */
export class VerifiedSecretCache {
  private readonly key = randomBytes(32).toString("base64");
  private readonly cache: LRUCache<string, string>;
  private readonly inflight = new Map<string, Promise<boolean>>();

  constructor(maxEntries: number) {
    this.cache = new LRUCache({ max: Math.max(1, maxEntries) });
  }

  /** The cache key of a presented secret within a namespace (e.g. "basic:alice"). */
  private keyOf(namespace: string, secret: string): string {
    return hash("sha256", `${this.key}\0${namespace}\0${secret}`, "base64");
  }

  /**
   * Whether `secret` is known to match `storedHash` (verified before, and that hash is still
   * the one it matched): the synchronous half of {@link verify}, for a caller that must
   * decide without awaiting. False says only "not known", never "wrong".
   */
  knows(namespace: string, secret: string, storedHash: string): boolean {
    return this.cache.get(this.keyOf(namespace, secret)) === storedHash;
  }

  /** Whether `secret` matches `storedHash`; PBKDF2 (off the event loop) only on a miss. */
  async verify(namespace: string, secret: string, storedHash: string): Promise<boolean> {
    const k = this.keyOf(namespace, secret);
    if (this.cache.get(k) === storedHash) return true;
    const flightKey = `${k}\0${storedHash}`;
    let pending = this.inflight.get(flightKey);
    if (!pending) {
      // Where hashing is refused (see withoutHashing) no flight is started: others joining
      // it would get that refusal instead of a verdict.
      const forbidden = hashingForbidden();
      if (forbidden !== undefined) throw forbidden;
      pending = verifySecret(secret, storedHash).finally(() => this.inflight.delete(flightKey));
      this.inflight.set(flightKey, pending);
    }
    const ok = await pending;
    if (ok) this.cache.set(k, storedHash);
    return ok;
  }

  /** Forget everything (tests, key compromise drills). */
  clear(): void {
    this.cache.clear();
  }
}
