import { randomFillSync } from "node:crypto";

/** Random bytes drawn in blocks: one `randomFillSync` per 512 ids rather than one per id. */
const POOL = Buffer.alloc(4096);
let poolAt = POOL.length;
let lastMs = 0;
/** RFC 9562 §6.2 method 1: a 12-bit counter in `rand_a`, so ids of one millisecond still sort in order. */
let counter = 0;

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
  hex(0, (hi >>> 8) & 0xff);
  hex(2, hi & 0xff);
  hex(4, lo >>> 24);
  hex(6, (lo >>> 16) & 0xff);
  hex(9, (lo >>> 8) & 0xff);
  hex(11, lo & 0xff);
  hex(14, 0x70 | (counter >>> 8));
  hex(16, counter & 0xff);
  hex(19, 0x80 | (POOL[r]! & 0x3f));
  hex(21, POOL[r + 1]!);
  for (let i = 2; i < 8; i++) hex(24 + 2 * (i - 2), POOL[r + i]!);
  return ID.toString("latin1", 0, 36);
}

/**
 * The id's characters, written in place and read out as one string: joined with `+`, the
 * 20 pieces of an id made a chain of intermediate strings, then a flat copy, about ten times
 * the id's own bytes on the heap, for every call. Every character is rewritten per id.
 */
const ID = Buffer.from("00000000-0000-0000-0000-000000000000", "latin1");
const DIGITS = Buffer.from("0123456789abcdef", "latin1");

function hex(at: number, byte: number): void {
  ID[at] = DIGITS[byte >>> 4]!;
  ID[at + 1] = DIGITS[byte & 0xf]!;
}
