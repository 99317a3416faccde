import { describe, expect, it } from "vitest";
import { toMillis } from "../src/storage/sql.js";

describe("toMillis", () => {
  it("reads both drivers' forms, and null as no time", () => {
    expect(toMillis(null)).toBeNull();
    expect(toMillis(undefined)).toBeNull();
    expect(toMillis(1_700_000_000_123)).toBe(1_700_000_000_123);
    expect(toMillis("1700000000123")).toBe(1_700_000_000_123);
    expect(toMillis("2026-11-23 12:21:47.287+00")).toBe(Date.parse("2026-11-23T12:21:47.287Z"));
    expect(toMillis(new Date(5))).toBe(5);
  });

  it("reads PostgreSQL's unbounded and five-digit-year timestamps", () => {
    expect(toMillis("infinity")).toBe(Number.POSITIVE_INFINITY);
    expect(toMillis("-infinity")).toBe(Number.NEGATIVE_INFINITY);
    expect(toMillis("10000-01-01 00:00:00+00")).toBe(253_402_300_800_000);
    // 9999-12-31T20:00Z in a database TimeZone of +09.
    expect(toMillis("10000-01-01 05:00:00+09")).toBe(Date.parse("9999-12-31T20:00:00Z"));
  });

  it("refuses a form it cannot read rather than reading it as no time (a revocation or an expiry)", () => {
    // PostgreSQL's DateStyle 'SQL, DMY': a revoked_at read as null passed for not revoked.
    expect(() => toMillis("07/12/2026 10:10:44.554086 UTC")).toThrow(/unexpected form/);
    expect(() => toMillis({})).toThrow(/unexpected form/);
  });
});
