import { describe, expect, it } from "vitest";
import { evenSchedules, timingScript } from "../bench/h2load.js";

/** The offsets (ms) of a timing script's lines. */
const offsets = (text: string) =>
  text
    .trimEnd()
    .split("\n")
    .map((line) => Number(line.split("\t")[0]));

describe("the bench's evenly spaced open loop (h2load --timing-script-file)", () => {
  it("puts every request of the total rate on its own slot, the connections interleaved, none two at once", () => {
    // 2,700 req/s over 10 connections: h2load's --rps would send 2–3 per connection every
    // 10 ms, all connections on the same tick (about 27 requests at once).
    const schedules = evenSchedules(2700, 10);
    expect(schedules).toHaveLength(10);
    const all: number[] = [];
    for (const s of schedules) {
      const script = timingScript(s, 100, "https://127.0.0.1:1/x");
      all.push(...offsets(script.text));
    }
    all.sort((a, b) => a - b);
    // 100 ms at 2,700 req/s: 270 requests, one every 1000 / 2700 ms, on the script's µs resolution.
    expect(all).toHaveLength(270);
    for (let i = 1; i < all.length; i++) expect(all[i]! - all[i - 1]!).toBeCloseTo(1000 / 2700, 2);
  });

  it("writes one line per request, offset and URL, as many as the span holds at the connection's interval", () => {
    const script = timingScript({ intervalMs: 2, startMs: 0.5 }, 10, "https://127.0.0.1:1/x");
    expect(script.count).toBe(5);
    expect(script.text).toBe(
      ["0.500", "2.500", "4.500", "6.500", "8.500"].map((t) => `${t}\thttps://127.0.0.1:1/x\n`).join(""),
    );
  });

  it("gives one connection the whole rate, one request every 1000 / rate ms", () => {
    const [only, ...rest] = evenSchedules(500, 1);
    expect(rest).toHaveLength(0);
    expect(only).toEqual({ intervalMs: 2, startMs: 0 });
  });
});
