import { describe, expect, it } from "vitest";
import { evenLoad, ONE_PER_TICK_RPS } from "../bench/h2load.js";

describe("the bench's spread-out open loop (bench/h2load.ts evenLoad)", () => {
  it("gives every connection at most one request per 10 ms tick, so no connection sends a burst", () => {
    // 2,700 req/s: h2load's --rps over 10 connections would send ~27 at once every 10 ms.
    const load = evenLoad(2700);
    expect(load.processes).toBe(27);
    expect(load.rpsEach).toBeLessThanOrEqual(ONE_PER_TICK_RPS);
    expect(load.offeredRps).toBe(2700);
  });

  it("offers the rate it was asked for within one request per second per connection", () => {
    for (const rate of [1, 99, 101, 259, 1290, 2720, 5437]) {
      const load = evenLoad(rate);
      expect(load.rpsEach, `${rate} req/s`).toBeLessThanOrEqual(ONE_PER_TICK_RPS);
      expect(Math.abs(load.offeredRps - rate), `${rate} req/s`).toBeLessThanOrEqual(load.processes / 2);
      expect(load.offeredRps).toBe(load.processes * load.rpsEach);
    }
  });

  it("needs one connection below one request per tick", () => {
    expect(evenLoad(50)).toEqual({ processes: 1, rpsEach: 50, offeredRps: 50 });
  });
});
