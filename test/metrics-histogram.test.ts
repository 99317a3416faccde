import { Histogram, Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { boundHistogramChild } from "../src/metrics/bound-histogram.js";

/**
 * The bound histogram child (src/metrics/bound-histogram.ts) writes into prom-client's
 * private store: its exposition must be byte for byte what prom-client's own child gives
 * for the same observations, label sets and order (sums in the same order, the +Inf
 * bucket, values on a bound), and it must keep working through `reset` and `remove`.
 */
const BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const LABELS = ["service", "method", "protocol", "code"];

function pair(): { ours: Histogram; theirs: Histogram; registries: [Registry, Registry] } {
  const registries: [Registry, Registry] = [new Registry(), new Registry()];
  const [ours, theirs] = registries.map(
    (registry) =>
      new Histogram({
        name: "tessera_rpc_duration_seconds",
        help: "Time.",
        labelNames: LABELS,
        buckets: BUCKETS,
        registers: [registry],
      }),
  );
  return { ours: ours!, theirs: theirs!, registries };
}

/** Observations that hit every bucket, the bounds themselves, past the last and zero. */
function values(n: number): number[] {
  const out: number[] = [0, 10, 10.5, 0.0005, 0.1, 1e-7];
  let x = 0.123456789;
  for (let i = 0; i < n; i++) {
    x = (x * 9301 + 0.49297) % 1;
    out.push(x ** 4 * 12);
  }
  return out;
}

const SETS = [
  ["tessera.v1.UserService", "GetCurrentUser", "connect", "ok"],
  ["tessera.v1.UserService", "GetCurrentUser", "grpc", "ok"],
  ["tessera.v1.UserService", "Login", "connect", "unauthenticated"],
  ["tessera.v1.TokenService", "ListTokens", "grpc-web", "ok"],
];

describe("boundHistogramChild", () => {
  it("gives the exposition prom-client's own children give, after many observations of several label sets", async () => {
    const { ours, theirs, registries } = pair();
    const bound = SETS.map((set) => boundHistogramChild(ours, LABELS, set));
    const own = SETS.map((set) => theirs.labels(...set));
    const vs = values(5000);
    // Label sets made in one order, observed interleaved: the exposition keeps the first.
    for (let i = 0; i < vs.length; i++) {
      const k = (i * 7) % 5 === 4 ? 0 : (i * 7) % 5;
      bound[k]!.observe(vs[i]!);
      own[k]!.observe(vs[i]!);
    }
    const [a, b] = await Promise.all(registries.map((r) => r.metrics()));
    expect(a).toBe(b);
    expect(a).toContain('le="+Inf",service="tessera.v1.UserService"');
    expect(a).not.toMatch(/_count\{[^}]*\} 0\n/);
  });

  it("refuses what prom-client refuses: a value that is not a finite number, a wrong label count", () => {
    const { ours } = pair();
    const child = boundHistogramChild(ours, LABELS, SETS[0]!);
    expect(() => child.observe(Number.NaN)).toThrow(TypeError);
    expect(() => child.observe(Number.POSITIVE_INFINITY)).toThrow(TypeError);
    expect(() => boundHistogramChild(ours, LABELS, ["a", "b"])).toThrow(/Invalid number of arguments/);
  });

  it("keeps counting through the histogram's reset and a label set's removal, as prom-client's child does", async () => {
    const { ours, theirs, registries } = pair();
    const bound = boundHistogramChild(ours, LABELS, SETS[0]!);
    const other = boundHistogramChild(ours, LABELS, SETS[1]!);
    const own = theirs.labels(...SETS[0]!);
    const ownOther = theirs.labels(...SETS[1]!);
    for (const v of values(100)) {
      bound.observe(v);
      own.observe(v);
    }
    ours.reset();
    theirs.reset();
    bound.observe(0.003);
    own.observe(0.003);
    other.observe(0.2);
    ownOther.observe(0.2);
    ours.remove(...SETS[0]!);
    theirs.remove(...SETS[0]!);
    bound.observe(0.7);
    own.observe(0.7);
    other.observe(0.01);
    ownOther.observe(0.01);
    const [a, b] = await Promise.all(registries.map((r) => r.metrics()));
    expect(a).toBe(b);
    expect(a).toContain(
      'tessera_rpc_duration_seconds_count{service="tessera.v1.UserService",method="GetCurrentUser",protocol="connect",code="ok"} 1',
    );
  });
});
