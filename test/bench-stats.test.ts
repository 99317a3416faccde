import { describe, expect, it } from "vitest";
import { median, pairedRatio, type RawLoad, runCpuUs, runRps, summarize } from "../bench/stats.js";

/** A run of `requests` requests over `seconds`, started at `startedAt`, costing `cpuMs` of server CPU. */
function run(requests: number, seconds: number, startedAt: number, cpuMs?: number): RawLoad {
  return {
    generator: "h2load",
    latenciesUs: Array.from({ length: requests }, (_, i) => 1000 + i),
    seconds,
    errors: 0,
    statuses: { "200": requests },
    startedAt,
    ...(cpuMs !== undefined ? { serverCpuMs: cpuMs } : {}),
  };
}

describe("benchmark statistics", () => {
  it("takes the median of the rounds for requests/s and CPU per request, so one slow slice does not decide", () => {
    // Three rounds at 100 req/s (1 ms CPU each), one at 20 req/s during a slow spell.
    const runs = [run(100, 1, 0, 100), run(20, 1, 10, 60), run(100, 1, 20, 100), run(100, 1, 30, 100)];
    const s = summarize(runs);
    expect(s.rps).toBe(100);
    expect(s.cpuUsPerRequest).toBe(1000);
    expect(s.requests).toBe(320);
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
  });

  it("pairs each slice with the baseline slice nearest in time", () => {
    // The machine is twice as slow between t=100 and t=200: baseline and scenario both see it.
    const baseline = [run(100, 1, 0, 100), run(50, 1, 150, 100)];
    const scenario = [run(90, 1, 10, 100), run(45, 1, 160, 100)];
    expect(pairedRatio(scenario, baseline, runRps)).toBeCloseTo(0.9);
    // Against whole-run averages the slow spell would have counted against the scenario
    // only if it fell on its slices; paired, it cancels out either way.
    const unlucky = [run(45, 1, 160, 100), run(45, 1, 170, 100)];
    expect(pairedRatio(unlucky, baseline, runRps)).toBeCloseTo(0.9);
  });

  it("inverts CPU per request, so that more CPU reads as a lower ratio", () => {
    const baseline = [run(100, 1, 0, 100)]; // 1000 µs per request
    const scenario = [run(100, 1, 5, 125)]; // 1250 µs per request
    expect(runCpuUs(scenario[0]!)).toBe(1250);
    expect(pairedRatio(scenario, baseline, runCpuUs, true)).toBeCloseTo(0.8);
    expect(pairedRatio(scenario, [], runRps)).toBeNull();
  });
});
