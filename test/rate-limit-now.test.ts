import { RateLimiterMemory, RateLimiterRedis } from "rate-limiter-flexible";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Limiter, type LimitResult } from "../src/rate-limit.js";

/**
 * `Limiter.consumeNow` counts in rate-limiter-flexible's memory store without the promise
 * its `consume` wraps the count in (admission decides a call synchronously with it). It
 * must decide exactly as the library does: the same count, remaining points, window and
 * refusal, the window rolling over at the same time.
 */
describe("a memory limiter's synchronous count (consumeNow)", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  /** The library's own verdict for one request, in a Limiter's terms. */
  async function library(impl: RateLimiterMemory, key: string): Promise<LimitResult> {
    try {
      const res = await impl.consume(key);
      return {
        allowed: true,
        limit: impl.points,
        remaining: res.remainingPoints,
        resetMs: res.msBeforeNext,
        consumed: res.consumedPoints,
        windowEnd: Date.now() + res.msBeforeNext,
      };
    } catch (res) {
      return {
        allowed: false,
        limit: impl.points,
        remaining: 0,
        resetMs: (res as { msBeforeNext: number }).msBeforeNext,
      };
    }
  }

  it("decides every request of a window, its refusals and the next window as RateLimiterMemory.consume does", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const points = 3;
    const reference = new RateLimiterMemory({ keyPrefix: "ip", points, duration: 60 });
    const limiter = new Limiter(
      new RateLimiterMemory({ keyPrefix: "ip", points, duration: 60 }),
      points,
      "ip",
    );
    const seen: LimitResult[] = [];
    // Two keys, interleaved, across two windows and past the limit in each.
    for (const step of [0, 1_000, 1_000, 20_000, 500, 40_000, 0, 1, 10_000]) {
      vi.advanceTimersByTime(step);
      for (const key of ["203.0.113.1", "203.0.113.2"]) {
        const now = limiter.consumeNow(key);
        expect(now).toEqual(await library(reference, key));
        seen.push(now!);
      }
    }
    // The sequence did what it is meant to cover: refusals, and counts starting again.
    expect(seen.some((r) => !r.allowed)).toBe(true);
    expect(seen.filter((r) => r.consumed === 1).length).toBeGreaterThanOrEqual(4);
    // Refusals are counted, and a spent key is remembered, as `consume` does.
    expect(limiter.refused).toBeGreaterThan(0);
  });

  it("shares its count with consume, refund and block", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const limiter = new Limiter(new RateLimiterMemory({ points: 2, duration: 60 }), 2);
    const first = await limiter.consume("k");
    expect(first.consumed).toBe(1);
    expect(limiter.consumeNow("k")?.consumed).toBe(2);
    expect(limiter.spentNow("k")?.allowed).toBe(false);
    await limiter.refund("k", first);
    expect(limiter.consumeNow("k")).toMatchObject({ allowed: true, remaining: 0, consumed: 2 });
    expect((await limiter.consume("k")).allowed).toBe(false);
    await limiter.block("other", 30);
    expect(limiter.consumeNow("other")).toMatchObject({ allowed: false, resetMs: 30_000 });
  });

  it("leaves a store that needs I/O (Redis), or a limiter that blocks or delays, to consume", () => {
    const memory = new RateLimiterMemory({ points: 5, duration: 60 });
    // Never connected: nothing is sent, the limiter is only built.
    const redis = new RateLimiterRedis({
      storeClient: {},
      points: 5,
      duration: 60,
      insuranceLimiter: memory,
    });
    expect(new Limiter(redis, 5).consumeNow("k")).toBeUndefined();
    const blocking = new RateLimiterMemory({ points: 5, duration: 60, blockDuration: 60 });
    expect(new Limiter(blocking, 5).consumeNow("k")).toBeUndefined();
    const even = new RateLimiterMemory({ points: 5, duration: 60, execEvenly: true });
    expect(new Limiter(even, 5).consumeNow("k")).toBeUndefined();
  });
});
