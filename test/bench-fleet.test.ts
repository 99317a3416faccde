import { describe, expect, it } from "vitest";
import { fleetLayout } from "../bench/pg-fleet.js";

describe("the bench's fleet layout (two instances and the load generator)", () => {
  const pinning = (cpus: number) => ({
    server: String(cpus - 1),
    others: cpus === 2 ? "0" : `0-${cpus - 2}`,
  });

  it("gives each instance a CPU of its own and the generator the rest from four CPUs on", () => {
    expect(fleetLayout(4, pinning(4))).toMatchObject({ a: "3", b: "2", generators: "0-1", ownCores: true });
    expect(fleetLayout(16, pinning(16))).toMatchObject({
      a: "15",
      b: "14",
      generators: "0-13",
      ownCores: true,
    });
  });

  it("puts both instances on the servers' CPU below four, and says the ratio cannot be measured there", () => {
    const two = fleetLayout(2, pinning(2));
    expect(two).toMatchObject({ a: "1", b: "1", generators: "0", ownCores: false });
    expect(two.describe).toContain("≥ 1.8× needs ≥ 4 cores");
    expect(fleetLayout(3, pinning(3))).toMatchObject({ a: "2", b: "2", generators: "0-1", ownCores: false });
  });

  it("pins nothing without the bench's pinning", () => {
    expect(fleetLayout(8, null)).toMatchObject({
      a: undefined,
      b: undefined,
      generators: undefined,
      ownCores: false,
    });
  });
});
