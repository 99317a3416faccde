import { describe, expect, it } from "vitest";
import { uuidV7 } from "../src/storage/uuid-v7.js";

describe("uuidV7", () => {
  it("spells the time, version, counter and variant in the 8-4-4-4-12 form", () => {
    const ms = 0x0123456789ab;
    const first = uuidV7(ms + 1_000_000);
    const id = uuidV7(ms + 2_000_000);
    const again = uuidV7(ms + 2_000_000);
    expect(first).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(id.slice(0, 13)).toBe(
      (ms + 2_000_000)
        .toString(16)
        .padStart(12, "0")
        .replace(/^(.{8})/, "$1-"),
    );
    // The second id of a millisecond carries counter 1, and every id its own random bits.
    expect(id.slice(14, 18)).toBe("7000");
    expect(again.slice(14, 18)).toBe("7001");
    expect(again.slice(19)).not.toBe(id.slice(19));
    expect([again, id, first].sort()).toEqual([first, id, again]);
  });
});
