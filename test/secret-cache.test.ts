import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { hashPool } from "../src/auth/hash-pool.js";
import { hashSecret } from "../src/auth/password.js";
import {
  SECRET_CACHE_ENTRY_BYTES,
  type SharedDigest,
  VerifiedSecretCache,
} from "../src/auth/secret-cache.js";
import { writesAnnouncedState } from "../src/storage/pg-write-hook.js";

/** The verified-secret cache on its own: its memory bound and its shared digests. */

const hashes = () => hashPool().stats().started;

/** A shared digest held in memory, as a credential row's column would hold it. */
function column(initial: string | null = null) {
  const state = { value: initial, saves: 0, freshReads: 0 };
  const shared = (): SharedDigest => ({
    stored: state.value,
    fresh: async () => {
      state.freshReads++;
      return state.value;
    },
    save: async (digest) => {
      state.saves++;
      state.value = digest;
    },
  });
  return { state, shared };
}

const settle = () => new Promise<void>((resolve) => setTimeout(resolve, 10));

describe("verified-secret cache", () => {
  it("evicts the least recently used entries to stay within its memory bound", () => {
    const key = randomBytes(32);
    const cache = new VerifiedSecretCache({ maxBytes: 10 * SECRET_CACHE_ENTRY_BYTES, sharedKey: key });
    const hash = "pbkdf2-sha256$1000$c2FsdA==$aGFzaA==";
    const add = (i: number) =>
      cache.knows(`token:${i}`, `secret-${i}`, hash, cache.sharedDigestOf(`token:${i}`, hash, `secret-${i}`));
    for (let i = 0; i < 25; i++) expect(add(i)).toBe(true);
    const stats = cache.stats();
    expect(stats.entries).toBe(10);
    expect(stats.evictions).toBe(15);
    expect(stats.bytes).toBe(10 * SECRET_CACHE_ENTRY_BYTES);
    expect(stats.maxBytes).toBe(10 * SECRET_CACHE_ENTRY_BYTES);
    // The newest ten are held; the oldest went (known without a digest only if held).
    expect(cache.knows("token:24", "secret-24", hash)).toBe(true);
    expect(cache.knows("token:0", "secret-0", hash)).toBe(false);
  });

  it("runs PBKDF2 once, stores the digest, and recognises the secret by it after an eviction", async () => {
    const hash = await hashSecret("the secret", 1_000);
    const cache = new VerifiedSecretCache({ maxBytes: SECRET_CACHE_ENTRY_BYTES, sharedKey: randomBytes(32) });
    const col = column();
    let before = hashes();
    expect(await cache.verify("token:a", "the secret", hash, col.shared())).toBe(true);
    expect(hashes() - before).toBe(1);
    await settle();
    expect(col.state.saves).toBe(1);
    expect(col.state.value).toBe(cache.sharedDigestOf("token:a", hash, "the secret"));
    expect(cache.stats().sharedWrites).toBe(1);

    // Another entry takes the only place: the first is evicted, and its digest answers.
    await cache.verify("token:b", "other", await hashSecret("other", 1_000));
    before = hashes();
    expect(await cache.verify("token:a", "the secret", hash, col.shared())).toBe(true);
    expect(hashes() - before).toBe(0);
    expect(cache.stats().sharedHits).toBe(1);
  });

  it("lets PBKDF2 decide when the stored digest does not match (another key, another hash, a wrong secret)", async () => {
    const hash = await hashSecret("right", 1_000);
    const other = new VerifiedSecretCache({ maxBytes: 1 << 16, sharedKey: randomBytes(32) });
    const foreign = other.sharedDigestOf("token:a", hash, "right")!;
    const cache = new VerifiedSecretCache({ maxBytes: 1 << 16, sharedKey: randomBytes(32) });
    // Another key's digest proves nothing: the right secret is still verified (by PBKDF2), and the digest replaced.
    const col = column(foreign);
    let before = hashes();
    expect(await cache.verify("token:a", "right", hash, col.shared())).toBe(true);
    expect(hashes() - before).toBe(1);
    await settle();
    expect(col.state.value).not.toBe(foreign);
    // A wrong secret against a stored digest: refused by PBKDF2, never by the digest alone, and nothing stored.
    const saves = col.state.saves;
    before = hashes();
    expect(await cache.verify("token:a", "wrong", hash, col.shared())).toBe(false);
    expect(hashes() - before).toBe(1);
    await settle();
    expect(col.state.saves).toBe(saves);
    // Bound to the credential and the hash: the same secret under another namespace or hash does not match it.
    expect(cache.knows("token:b", "right", hash, col.state.value)).toBe(false);
    const rehashed = await hashSecret("right", 1_000);
    expect(cache.knows("token:a", "right", rehashed, col.state.value)).toBe(false);
  });

  it("reads the stored digest afresh when the row brought none (a row cached before it was stored)", async () => {
    const hash = await hashSecret("s", 1_000);
    const cache = new VerifiedSecretCache({ maxBytes: 1 << 16, sharedKey: randomBytes(32) });
    const col = column(cache.sharedDigestOf("token:a", hash, "s"));
    const before = hashes();
    const stale: SharedDigest = { ...col.shared(), stored: null };
    expect(await cache.verify("token:a", "s", hash, stale)).toBe(true);
    expect(col.state.freshReads).toBe(1);
    expect(hashes() - before).toBe(0);
  });

  it("shares one PBKDF2 and one stored digest between concurrent first uses", async () => {
    const hash = await hashSecret("c", 1_000);
    const cache = new VerifiedSecretCache({ maxBytes: 1 << 16, sharedKey: randomBytes(32) });
    const col = column();
    const before = hashes();
    const results = await Promise.all(
      Array.from({ length: 8 }, () => cache.verify("token:c", "c", hash, col.shared())),
    );
    expect(results.every(Boolean)).toBe(true);
    expect(hashes() - before).toBe(1);
    await settle();
    expect(col.state.saves).toBe(1);
  });

  it("counts a digest it could not store, and still answers the request", async () => {
    const hash = await hashSecret("f", 1_000);
    const warnings: object[] = [];
    const cache = new VerifiedSecretCache({
      maxBytes: 1 << 16,
      sharedKey: randomBytes(32),
      logger: { warn: (obj) => warnings.push(obj) },
    });
    const failing: SharedDigest = {
      stored: null,
      fresh: async () => null,
      save: async () => {
        throw new Error("database is gone: update ... set verified_digest = 'xyz'");
      },
    };
    expect(await cache.verify("token:f", "f", hash, failing)).toBe(true);
    await settle();
    expect(cache.stats().sharedWriteFailures).toBe(1);
    expect(warnings).toHaveLength(1);
    // A second failure in the same run is counted, not logged again.
    expect(await cache.verify("token:g", "f", hash, failing)).toBe(true);
    await settle();
    expect(cache.stats().sharedWriteFailures).toBe(2);
    expect(warnings).toHaveLength(1);
    // What the database said (it may carry the digest in its SQL) is not logged.
    expect(JSON.stringify(warnings)).not.toContain("verified_digest");
  });

  it("neither reads nor stores a digest without a shared key", async () => {
    const hash = await hashSecret("n", 1_000);
    const cache = new VerifiedSecretCache({ maxBytes: 1 << 16 });
    const col = column("anything");
    expect(cache.sharedDigestOf("token:n", hash, "n")).toBeUndefined();
    expect(await cache.verify("token:n", "n", hash, col.shared())).toBe(true);
    await settle();
    expect(col.state.saves).toBe(0);
    expect(col.state.freshReads).toBe(0);
  });

  it("stores a digest without a PostgreSQL write barrier, unless the statement changes more than the digest", () => {
    expect(
      writesAnnouncedState("update api_tokens set verified_digest = ? where id = ? and secret_hash = ?"),
    ).toBe(false);
    expect(writesAnnouncedState("update machine_credentials set verified_digest = ? where id = ?")).toBe(
      false,
    );
    expect(
      writesAnnouncedState("update api_tokens set verified_digest = ?, secret_hash = ? where id = ?"),
    ).toBe(true);
    expect(writesAnnouncedState("update api_tokens set secret_hash = ? where id = ?")).toBe(true);
  });
});
