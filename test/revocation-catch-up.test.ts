import { describe, expect, it } from "vitest";
import type { RevocationRecord } from "../src/storage/repositories/revocation-events.js";
import { KEPT_EVENTS, RevocationCatchUp } from "../src/verification/revocation-catch-up.js";
import { CursorCodec } from "../src/verification/revocation-cursor.js";

/**
 * RevocationCatchUp against a feed it is told about by hand and a database of events in a map:
 * what it claims (`applied`) when a read of the newest event straddles a restart of the feed
 * (its ids went back), what an opened cursor's mark keeps alive, and what a cursor whose event
 * it no longer remembers costs. The two instances' end-to-end cases are in
 * test/security/verify-behind-watch.test.ts, the old cursors' in test/security/verify-old-cursors.test.ts.
 */

const event = (id: number, timeline = "before"): RevocationRecord =>
  ({
    id,
    kind: "credential",
    subjectId: `s${id}-${timeline}`,
    tenantId: "t",
    occurredAt: 1000 + id,
  }) as RevocationRecord;

/** The database's events, by id, and the reads made of it. */
class Events {
  readonly rows = new Map<number, RevocationRecord>();
  readonly reads = { newest: 0, at: 0 };
  /** Set: the next reads of the newest event wait for it. */
  newestAnswer: Promise<RevocationRecord | undefined> | undefined;

  add(events: RevocationRecord[]): RevocationRecord[] {
    for (const e of events) this.rows.set(e.id, e);
    return events;
  }
  newest = async (): Promise<RevocationRecord | undefined> => {
    this.reads.newest++;
    return this.newestAnswer ?? this.rows.get(Math.max(0, ...this.rows.keys()));
  };
  /** The read the code before this one made, in its place. */
  lastId = async (): Promise<number> => (await this.newest())?.id ?? 0;
  at = async (id: number): Promise<RevocationRecord | undefined> => {
    this.reads.at++;
    return this.rows.get(id);
  };
  /** Through which id retention deleted the events, and how often that was read. */
  prunedThrough = 0;
  infoReads = 0;
  info = async () => {
    this.infoReads++;
    return { databaseId: "db", prunedThrough: this.prunedThrough };
  };
}

function rig(events = new Events()) {
  const codec = new CursorCodec("feed");
  const batches: ((b: { events: RevocationRecord[]; position: number }) => void)[] = [];
  const lost: (() => void)[] = [];
  const feed = {
    cursors: codec,
    last: undefined as RevocationRecord | undefined,
    restarts: 0,
    get position() {
      return this.last?.id ?? 0;
    },
    get anchor() {
      return this.last;
    },
    subscribe: (fn: (typeof batches)[number]) => {
      batches.push(fn);
      return () => {};
    },
    onLost: (fn: () => void) => {
      lost.push(fn);
      return () => {};
    },
    wakes: 0,
    wake() {
      this.wakes++;
    },
  };
  const flushes = { count: 0 };
  const catchUp = new RevocationCatchUp({
    feed: feed as never,
    events: events as never,
    sql: { evictState: () => void flushes.count++ },
  });
  return {
    codec,
    catchUp,
    flushes,
    feed,
    events,
    deliver(events: RevocationRecord[]) {
      feed.last = events.at(-1);
      for (const fn of batches) fn({ events, position: feed.last!.id });
    },
    restart(newest: RevocationRecord) {
      feed.last = newest;
      feed.restarts++;
      for (const fn of lost) fn();
    },
  };
}

describe("RevocationCatchUp", () => {
  it("claims nothing from a read of the newest event begun before the feed restarted", async () => {
    let answer!: (e: RevocationRecord) => void;
    const r = rig();
    r.events.newestAnswer = new Promise((resolve) => (answer = resolve));
    r.deliver(Array.from({ length: 100 }, (_, i) => event(i + 1)));
    // A caller ahead of the feed: a read of the newest id starts.
    const ahead = r.catchUp.behind(r.codec.seal(event(101)))!;
    const caught = r.catchUp.catchUp(ahead, 60_000);
    // Meanwhile a restore: ids back to 80, the feed restarts there.
    r.restart(event(80, "after"));
    expect(r.catchUp.applied).toBe(80);
    // The read begun before it answers the old timeline's newest event.
    answer(event(101));
    await caught;
    expect(r.catchUp.applied).toBe(80);
    // The new timeline's events up to 95 (a revocation among them), read by the feed: the cache
    // is emptied for them, and a cursor at 95 is vouched for only then.
    const flushed = r.flushes.count;
    r.deliver(Array.from({ length: 15 }, (_, i) => event(81 + i, "after")));
    expect(r.flushes.count).toBe(flushed + 1);
    expect(r.catchUp.applied).toBe(95);
  });

  it("vouches without a read for a cursor thousands of events old (a caller cycling old cursors empties no cache)", async () => {
    const r = rig();
    const events = r.events.add(Array.from({ length: 5000 }, (_, i) => event(i + 1)));
    for (let i = 0; i < events.length; i += 500) r.deliver(events.slice(i, i + 500));
    expect(KEPT_EVENTS).toBeGreaterThanOrEqual(5000);
    const flushed = r.flushes.count;
    for (const e of events) expect(r.catchUp.behind(r.codec.seal(e))).toBeUndefined();
    expect(r.events.reads).toEqual({ newest: 0, at: 0 });
    expect(r.flushes.count).toBe(flushed);
  });

  /** A feed past KEPT_EVENTS: the marks of its first 100 events are no longer kept. */
  function longFeed() {
    const r = rig();
    const events = r.events.add(Array.from({ length: KEPT_EVENTS + 100 }, (_, i) => event(i + 1)));
    for (let i = 0; i < events.length; i += 500) r.deliver(events.slice(i, i + 500));
    return { r, applied: events.at(-1)!, flushed: r.flushes.count };
  }

  it("settles a cursor whose event it no longer remembers by reading that event and the applied one, the cache kept", async () => {
    const { r, applied, flushed } = longFeed();
    const cursor = r.catchUp.behind(r.codec.seal(event(1)))!;
    expect(cursor).toBeDefined();
    await r.catchUp.catchUp(cursor, 60_000);
    expect(r.flushes.count).toBe(flushed);
    expect(r.events.reads).toEqual({ newest: 0, at: 2 });
    expect(r.feed.wakes).toBe(0);
    expect(r.catchUp.applied).toBe(applied.id);
    // Vouched for: the same cursor, and another sealed at the same event, cost nothing more.
    expect(cursor.vouched).toBe(0);
    expect(r.catchUp.behind(r.codec.seal(event(1)))).toBeUndefined();
    expect(r.events.reads.at).toBe(2);
  });

  it("shares the read of the applied event among concurrent callers with old cursors, the cache kept", async () => {
    const { r, flushed } = longFeed();
    const cursors = Array.from({ length: 50 }, (_, i) => r.catchUp.behind(r.codec.seal(event(i + 1)))!);
    await Promise.all(cursors.map((c) => r.catchUp.catchUp(c, 60_000)));
    expect(r.flushes.count).toBe(flushed);
    // One read of each cursor's event; the applied one's read once or twice, not per caller.
    expect(r.events.reads.at).toBeLessThanOrEqual(52);
    expect(r.events.reads.newest).toBe(0);
  });

  it("catches up as before (the newest event read, the cache emptied) when the event at the cursor's id is another", async () => {
    const { r, flushed } = longFeed();
    // A cursor of event 1 as another timeline drew it (the caller's feed before a restore).
    const cursor = r.catchUp.behind(r.codec.seal(event(1, "elsewhere")))!;
    await r.catchUp.catchUp(cursor, 60_000);
    expect(r.events.reads).toEqual({ newest: 1, at: 1 });
    expect(r.feed.wakes).toBe(1);
    expect(r.flushes.count).toBe(flushed + 1);
  });

  it.each([
    ["drawn again for other events", (e: Events, id: number) => e.add([event(id, "after")])],
    ["gone (the ids went back)", (e: Events, id: number) => e.rows.delete(id)],
  ])("catches up as before when the applied event is no longer there: %s", async (_, restore) => {
    const { r, applied, flushed } = longFeed();
    // Restored from a backup this instance's feed has not read since: the event at 1 is the
    // caller's, but what this instance claimed was read on a timeline the database left.
    restore(r.events, applied.id);
    const cursor = r.catchUp.behind(r.codec.seal(event(1)))!;
    await r.catchUp.catchUp(cursor, 60_000);
    expect(r.events.reads).toEqual({ newest: 1, at: 2 });
    expect(r.feed.wakes).toBe(1);
    expect(r.flushes.count).toBe(flushed + 1);
  });

  it("settles a cursor whose event retention deleted by the applied event alone, the cache kept", async () => {
    const { r, applied, flushed } = longFeed();
    for (let id = 1; id <= 100; id++) r.events.rows.delete(id);
    r.events.prunedThrough = 100;
    const cursor = r.catchUp.behind(r.codec.seal(event(1)))!;
    await r.catchUp.catchUp(cursor, 60_000);
    expect(r.flushes.count).toBe(flushed);
    expect(r.events.reads).toEqual({ newest: 0, at: 2 });
    expect(r.events.infoReads).toBe(1);
    expect(r.feed.wakes).toBe(0);
    expect(r.catchUp.applied).toBe(applied.id);
    expect(cursor.vouched).toBe(0);
  });

  it("catches up as before when the event at the cursor's id is gone but retention did not take it", async () => {
    const { r, flushed } = longFeed();
    r.events.rows.delete(1);
    const cursor = r.catchUp.behind(r.codec.seal(event(1)))!;
    await r.catchUp.catchUp(cursor, 60_000);
    expect(r.events.reads).toEqual({ newest: 1, at: 1 });
    expect(r.flushes.count).toBe(flushed + 1);
  });

  it("empties the cache once for a cursor left past the feed's end by a restore, whichever of its strings comes", async () => {
    const r = rig();
    r.deliver(r.events.add(Array.from({ length: 200 }, (_, i) => event(i + 1))));
    // More strings of one position (each stream message has its own) than opened cursors are kept.
    const strings = Array.from({ length: 1_100 }, () => r.codec.seal(event(150)));
    for (let id = 101; id <= 200; id++) r.events.rows.delete(id);
    r.restart(event(100));
    const flushed = r.flushes.count;
    for (let round = 0; round < 2; round++)
      for (const s of strings) {
        const behind = r.catchUp.behind(s);
        if (behind) await r.catchUp.catchUp(behind, 60_000);
      }
    expect(r.flushes.count).toBe(flushed + 1);
    expect(r.events.reads.newest).toBe(1);
  });

  it("answers Unavailable when the event at the cursor's id cannot be read, neither vouching nor emptying the cache", async () => {
    const { r, flushed } = longFeed();
    r.events.at = async () => {
      throw new Error("connection terminated");
    };
    const cursor = r.catchUp.behind(r.codec.seal(event(1)))!;
    await expect(r.catchUp.catchUp(cursor, 60_000)).rejects.toMatchObject({
      reason: "UNAVAILABLE",
      headers: { "retry-after": "1" },
    });
    expect(cursor.vouched).toBe(-1);
    expect(r.flushes.count).toBe(flushed);
  });

  it("keeps an opened cursor's mark in memory of its own, not a view of a larger buffer", () => {
    const r = rig();
    r.deliver(r.events.add([event(1)]));
    const cursor = r.catchUp.behind(r.codec.seal(event(2)))!;
    expect(cursor.mark).toBeDefined();
    expect(cursor.mark!.buffer.byteLength).toBe(cursor.mark!.length);
  });
});
