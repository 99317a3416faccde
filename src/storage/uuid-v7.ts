import { randomFillSync } from "node:crypto";

/** Random bytes drawn in blocks: one `randomFillSync` per 512 ids rather than one per id. */
const POOL = Buffer.alloc(4096);
let poolAt = POOL.length;
let lastMs = 0;
/** RFC 9562 §6.2 method 1: a 12-bit counter in `rand_a`, so ids of one millisecond still sort in order. */
let counter = 0;
const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/**
 * A time-ordered UUID (version 7, RFC 9562): 48 bits of Unix milliseconds, a counter, and 62
 * random bits, in the usual lowercase 8-4-4-4-12 form. Ids made one after another sort in
 * that order (within this process), so a table keyed by them grows at the end of its
 * primary-key index: an insert touches the index's last page, not a random one (with v4
 * ids every row of a batch dirtied its own page, and SQLite wrote each one to the WAL).
 *
 * Hand-written rather than the `uuid` package's v7, measured against it
 * (bench/results/2026-12-05-uuid.md): that one takes a fresh 16-byte array and a
 * `crypto.getRandomValues` call for every id, several times the instructions of this one,
 * and an id is made for every call the server answers. Its counter also orders only the ids
 * it timestamps itself, with `Date.now()`; the audit log stamps ids with its injected clock.
 */
export function uuidV7(now: number = Date.now()): string {
  if (now > lastMs) {
    lastMs = now;
    counter = 0;
  } else if (++counter > 0xfff) {
    // 4096 ids in one millisecond: borrow the next one, as the RFC allows, to stay ordered.
    lastMs++;
    counter = 0;
  }
  if (poolAt + 8 > POOL.length) {
    randomFillSync(POOL);
    poolAt = 0;
  }
  const r = poolAt;
  poolAt += 8;
  const ms = lastMs;
  const hi = Math.floor(ms / 0x1_0000_0000);
  const lo = ms >>> 0;
  return (
    HEX[(hi >>> 8) & 0xff]! +
    HEX[hi & 0xff]! +
    HEX[lo >>> 24]! +
    HEX[(lo >>> 16) & 0xff]! +
    "-" +
    HEX[(lo >>> 8) & 0xff]! +
    HEX[lo & 0xff]! +
    "-" +
    HEX[0x70 | (counter >>> 8)]! +
    HEX[counter & 0xff]! +
    "-" +
    HEX[0x80 | (POOL[r]! & 0x3f)]! +
    HEX[POOL[r + 1]!]! +
    "-" +
    HEX[POOL[r + 2]!]! +
    HEX[POOL[r + 3]!]! +
    HEX[POOL[r + 4]!]! +
    HEX[POOL[r + 5]!]! +
    HEX[POOL[r + 6]!]! +
    HEX[POOL[r + 7]!]!
  );
}
