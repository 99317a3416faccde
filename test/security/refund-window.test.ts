import { RateLimiterMemory } from "rate-limiter-flexible";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Limiter, PasswordGuard } from "../../src/rate-limit.js";

/**
 * A password check's reservation is given back on success, but only within the window it
 * was taken in: a refund landing after the window rolled over would be credit in the next
 * one. PBKDF2 and a queue can carry checks past a window's end, so an attacker who times
 * 20 logins to its own accounts at the end of a window would otherwise guess 40 times.
 * (The limiters alone, with the clock faked: a minute-long window over TLS would be a minute of test.)
 */
const BUDGET = 20;
const limiter = (points: number, seconds: number) =>
  new Limiter(new RateLimiterMemory({ points, duration: seconds }), points);
const guard = () =>
  new PasswordGuard(limiter(BUDGET, 60), limiter(1000, 3600), limiter(5, 3600), limiter(1e9, 86400), {
    failures: 5,
    seconds: 60,
    maxSeconds: 3600,
  });

/** Reservations `guard` grants at `ip` for distinct usernames before refusing one. */
async function reservationsGranted(g: PasswordGuard, ip: string, prefix: string): Promise<number> {
  for (let i = 0; i < BUDGET * 3; i++) {
    try {
      await g.reserve(ip, `${prefix}-${i}`);
    } catch {
      return i;
    }
  }
  return Number.POSITIVE_INFINITY;
}

describe("refunds of a password check's reservation", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("give no credit in the next window when the check ends after its window rolled over", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const g = guard();
    const ip = "203.0.113.9";
    const own = await Promise.all(Array.from({ length: BUDGET }, (_, i) => g.reserve(ip, `mallory-${i}`)));
    vi.advanceTimersByTime(61_000);
    await Promise.all(own.map((a) => a.succeeded()));
    expect(await reservationsGranted(g, ip, "victim")).toBe(BUDGET);
  });

  it("are given back within the window they were taken in", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const g = guard();
    const ip = "203.0.113.10";
    const own = await Promise.all(Array.from({ length: BUDGET }, (_, i) => g.reserve(ip, `mallory-${i}`)));
    vi.advanceTimersByTime(30_000);
    await Promise.all(own.map((a) => a.succeeded()));
    expect(await reservationsGranted(g, ip, "victim")).toBe(BUDGET);
  });
});

describe("a limiter's synchronous view of spent keys (spentNow)", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("knows a key spent once its last point is counted, until a refund or the window's end", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const l = limiter(2, 60);
    expect(l.spentNow("a")).toBeUndefined();
    await l.consume("a");
    expect(l.spentNow("a")).toBeUndefined();
    const last = await l.consume("a");
    expect(last.allowed).toBe(true);
    const spent = l.spentNow("a");
    expect(spent).toMatchObject({ allowed: false, limit: 2, remaining: 0 });
    expect(spent!.resetMs).toBeGreaterThan(59_000);
    // Another key is not affected.
    expect(l.spentNow("b")).toBeUndefined();
    // A point given back: the next call would be counted, so it is not spent any more.
    await l.refund("a", last);
    expect(l.spentNow("a")).toBeUndefined();
    expect((await l.consume("a")).allowed).toBe(true);
    expect((await l.consume("a")).allowed).toBe(false);
    expect(l.spentNow("a")).toBeDefined();
    vi.advanceTimersByTime(61_000);
    expect(l.spentNow("a")).toBeUndefined();
  });

  it("knows a blocked key for the block's length", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const l = limiter(5, 60);
    await l.block("c", 300);
    expect(l.spentNow("c")!.resetMs).toBeGreaterThan(299_000);
    await l.reset("c");
    expect(l.spentNow("c")).toBeUndefined();
  });
});
