import { describe, expect, it } from "vitest";
import { RowBuckets } from "../src/storage/row-cache.js";

/** The storage of the state caches (SQLite's and PostgreSQL's): bounded, and observable. */
describe("the state cache's rows", () => {
  const users = "select * from users where id = ?";
  const tenants = "select * from tenants where id = ?";

  it("keeps at most its bound per statement, dropping the least recently used", () => {
    const rows = new RowBuckets(3);
    for (const id of ["a", "b", "c"]) rows.set(users, [id], { id });
    expect(rows.get(users, ["a"])).toEqual({ id: "a" });
    rows.set(users, ["d"], { id: "d" });
    // b was the least recently used.
    expect(rows.get(users, ["b"])).toBeUndefined();
    for (const id of ["a", "c", "d"]) expect(rows.get(users, [id])).toEqual({ id });
    // Another statement has a bound of its own and takes nothing from this one.
    for (const id of ["t1", "t2", "t3"]) rows.set(tenants, [id], { id });
    for (const id of ["a", "c", "d"]) expect(rows.get(users, [id])).toEqual({ id });
    // A working set far past the bound: only the last three stay.
    for (let i = 0; i < 10_000; i++) rows.set(users, [String(i)], { id: i });
    const kept = Array.from({ length: 10_000 }, (_, i) => i).filter(
      (i) => rows.get(users, [String(i)]) !== undefined,
    );
    expect(kept).toEqual([9997, 9998, 9999]);
  });

  it("counts hits and invalidations, never keeps an empty answer, and hands out frozen rows", () => {
    const rows = new RowBuckets(10);
    rows.set(users, ["none"], undefined);
    rows.set(users, ["empty"], []);
    expect(rows.get(users, ["none"])).toBeUndefined();
    expect(rows.get(users, ["empty"])).toBeUndefined();
    expect(rows.counters.hits).toBe(0);
    rows.set(users, ["a"], { id: "a" });
    const hit = rows.get<{ id: string }>(users, ["a"]);
    expect(Object.isFrozen(hit)).toBe(true);
    expect(rows.counters.hits).toBe(1);
    rows.clear();
    expect(rows.counters.invalidations).toBe(1);
    expect(rows.get(users, ["a"])).toBeUndefined();
  });
});
