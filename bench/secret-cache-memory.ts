/**
 * Heap bytes per entry of the verified-secret cache (src/auth/secret-cache.ts), measured:
 * `node --expose-gc --import tsx bench/secret-cache-memory.ts [entries]` (default 1,000,000).
 * Fills a cache whose bound is far above what it will hold (entries go in through a shared
 * digest, so no PBKDF2), and compares the heap after a full GC before and after. The
 * result sets SECRET_CACHE_ENTRY_BYTES, which turns `auth.tokens.cacheMaxBytes` into entries.
 */
import { randomBytes } from "node:crypto";
import { SECRET_CACHE_ENTRY_BYTES, VerifiedSecretCache } from "../src/auth/secret-cache.js";

const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) {
  process.stderr.write("run with node --expose-gc\n");
  process.exit(2);
}
const entries = Number(process.argv[2] ?? 1_000_000);
const heap = () => {
  gc();
  gc();
  return process.memoryUsage().heapUsed;
};

const cache = new VerifiedSecretCache({
  maxBytes: entries * SECRET_CACHE_ENTRY_BYTES * 4,
  sharedKey: randomBytes(32),
});
const storedHash = `pbkdf2-sha256$600000$${randomBytes(16).toString("base64")}$${randomBytes(32).toString("base64")}`;
const before = heap();
for (let i = 0; i < entries; i++) {
  const namespace = `token:${i.toString(16).padStart(8, "0")}-0000-4000-8000-000000000000`;
  const secret = `s${i.toString(36).padStart(31, "0")}`;
  if (!cache.knows(namespace, secret, storedHash, cache.sharedDigestOf(namespace, storedHash, secret)))
    throw new Error("entry not taken");
}
const after = heap();
const stats = cache.stats();
if (stats.entries !== entries) throw new Error(`cache holds ${stats.entries} entries, expected ${entries}`);
const perEntry = (after - before) / entries;
process.stdout.write(
  `${JSON.stringify({
    node: process.version,
    entries,
    heapBytes: after - before,
    bytesPerEntry: Math.round(perEntry * 10) / 10,
    mibPerMillion: Math.round(((perEntry * 1e6) / 2 ** 20) * 10) / 10,
    assumed: SECRET_CACHE_ENTRY_BYTES,
  })}\n`,
);
