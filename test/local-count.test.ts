import { describe, expect, it } from "vitest";
import { LocalCount } from "../src/rate-limit/local-count.js";

/** The per-instance count of a shared limit while Redis is away (src/rate-limit/local-count.ts), on a clock of its own. */
describe("LocalCount", () => {
  const clock = () => {
    let t = 1_000_000;
    return { now: () => t, advance: (ms: number) => (t += ms) };
  };

  it("counts on from the key's last count in Redis within its window, and from zero after it", () => {
    const c = clock();
    const local = new LocalCount(3, 60_000, c.now);
    local.counted("k", 0, 2, c.now() + 10_000);
    expect(local.consume("k")).toMatchObject({ allowed: true, consumed: 3 });
    expect(local.consume("k")).toMatchObject({ allowed: false, consumed: 4 });
    expect(local.owed("k")).toBe(2);
    c.advance(10_000);
    expect(local.consume("k")).toMatchObject({ allowed: true, consumed: 1, resetMs: 60_000 });
  });

  it("owes Redis what it counted until Redis takes it, and only what Redis took is paid", () => {
    const local = new LocalCount(3, 60_000);
    local.consume("k");
    local.consume("k");
    const owed = local.owed("k");
    local.consume("k"); // counted while the first push was on its way
    local.counted("k", owed, 3, Date.now() + 60_000);
    expect(local.owed("k")).toBe(1);
    local.counted("k", 1, 4, Date.now() + 60_000);
    expect(local.owed("k")).toBe(0);
  });

  it("never gives back more than it counted: a refund is no credit", () => {
    const local = new LocalCount(2, 60_000);
    local.consume("k");
    local.refund("k");
    local.refund("k");
    expect(local.consume("k")).toMatchObject({ allowed: true, consumed: 1 });
    expect(local.consume("k")).toMatchObject({ allowed: true, consumed: 2 });
    expect(local.consume("k").allowed).toBe(false);
  });

  it("holds a block made here for its length, which replaces the key's count and window", () => {
    const c = clock();
    const local = new LocalCount(2, 3_600_000, c.now);
    local.consume("k");
    local.block("k", 30_000);
    expect(local.blockedMs("k")).toBe(30_000);
    expect(local.owed("k")).toBe(0);
    c.advance(30_000);
    expect(local.blockedMs("k")).toBe(0);
    expect(local.consume("k")).toMatchObject({ allowed: true, consumed: 1 });
  });
});
