import { describe, expect, it } from "vitest";
import type { RevocationRecord } from "../src/storage/repositories/revocation-events.js";
import { KEPT_EVENTS, RevocationCatchUp } from "../src/verification/revocation-catch-up.js";
import { CursorCodec } from "../src/verification/revocation-cursor.js";

/**
 * RevocationCatchUp against a feed it is told about by hand: what it claims (`applied`) when
 * a read of the newest id straddles a restart of the feed (its ids went back), and what an
 * opened cursor's mark keeps alive. The two instances' end-to-end cases are in
 * test/security/verify-behind-watch.test.ts.
 */

const event = (id: number, timeline = "before"): RevocationRecord =>
  ({
    id,
    kind: "credential",
    subjectId: `s${id}-${timeline}`,
    tenantId: "t",
    occurredAt: 1000 + id,
  }) as RevocationRecord;

function rig(lastId: () => Promise<number>) {
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
    wake() {},
  };
  const flushes = { count: 0 };
  const catchUp = new RevocationCatchUp({
    feed: feed as never,
    events: { lastId } as never,
    sql: { evictState: () => void flushes.count++ },
  });
  return {
    codec,
    catchUp,
    flushes,
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
  it("claims nothing from a read of the newest id begun before the feed restarted", async () => {
    let answer!: (id: number) => void;
    const r = rig(() => new Promise<number>((resolve) => (answer = resolve)));
    r.deliver(Array.from({ length: 100 }, (_, i) => event(i + 1)));
    // A caller ahead of the feed: a read of the newest id starts.
    const ahead = r.catchUp.behind(r.codec.seal(event(101)))!;
    const caught = r.catchUp.catchUp(ahead, 60_000);
    // Meanwhile a restore: ids back to 80, the feed restarts there.
    r.restart(event(80, "after"));
    expect(r.catchUp.applied).toBe(80);
    // The read begun before it answers the old timeline's newest id.
    answer(101);
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
    const reads = { count: 0 };
    const r = rig(async () => {
      reads.count++;
      return 5000;
    });
    const events = Array.from({ length: 5000 }, (_, i) => event(i + 1));
    for (let i = 0; i < events.length; i += 500) r.deliver(events.slice(i, i + 500));
    expect(KEPT_EVENTS).toBeGreaterThanOrEqual(5000);
    const flushed = r.flushes.count;
    for (const e of events) expect(r.catchUp.behind(r.codec.seal(e))).toBeUndefined();
    expect(reads.count).toBe(0);
    expect(r.flushes.count).toBe(flushed);
  });

  it("keeps an opened cursor's mark in memory of its own, not a view of a larger buffer", () => {
    const r = rig(async () => 1);
    r.deliver([event(1)]);
    const cursor = r.catchUp.behind(r.codec.seal(event(2)))!;
    expect(cursor.mark).toBeDefined();
    expect(cursor.mark!.buffer.byteLength).toBe(cursor.mark!.length);
  });
});
