// A prom-client histogram child bound to its label set's entry, so that an observation
// costs no label hashing: what the request path observes once per call.
import type { Histogram } from "prom-client";

/** One label set's values, as prom-client 15.1.3 keeps them (`Histogram.hashMap[hash]`). */
interface HistogramEntry {
  labels: object;
  bucketValues: Record<string, number>;
  sum: number;
  count: number;
}

/** What this reads of prom-client's histogram: private fields. */
interface Internals {
  hashMap?: Record<string, HistogramEntry>;
  upperBounds?: readonly number[];
}

/**
 * The child of `histogram` for `values` (of `labelNames`, in order), whose `observe` does
 * what prom-client's child does (the same sum, count and bucket of the same entry, so the
 * exposition is the same) without re-validating and re-hashing its labels into a new
 * string on every call, as prom-client's own child does. The entry is prom-client's
 * private `hashMap` (package.json pins its exact version; test/metrics-histogram.test.ts
 * compares the exposition with the library's own child's): the library's child makes it
 * at the first observation, and again after a `reset` or `remove`, and this one finds it
 * then; a value prom-client refuses goes to it too, to be refused the same way.
 */
export function boundHistogramChild(
  histogram: Histogram,
  labelNames: readonly string[],
  values: readonly string[],
): { observe(value: number): void } {
  // Validates the values (and their number) as prom-client does.
  const child = histogram.labels(...values);
  const internals = histogram as unknown as Internals;
  const bounds = internals.upperBounds ?? [];
  const keys = bounds.map(String);
  let map: Record<string, HistogramEntry> | undefined;
  let hash = "";
  let entry: HistogramEntry | undefined;
  /** The entry of this label set, as the library's child just made or found it. */
  const bind = (): void => {
    map = internals.hashMap;
    entry = undefined;
    if (map === undefined) return;
    for (const key in map) {
      const found = map[key]!;
      const labels = found.labels as Record<string, unknown>;
      if (!labelNames.every((name, i) => labels[name] === values[i])) continue;
      // Not where this version keeps its buckets: the library's child does it all.
      if (!keys.every((k) => Object.hasOwn(found.bucketValues, k))) return;
      hash = key;
      entry = found;
      return;
    }
  };
  return {
    observe(value: number): void {
      if (
        entry === undefined ||
        internals.hashMap !== map ||
        map?.[hash] !== entry ||
        !Number.isFinite(value)
      ) {
        child.observe(value);
        bind();
        return;
      }
      entry.sum += value;
      entry.count += 1;
      for (let i = 0; i < bounds.length; i++) {
        if (value <= bounds[i]!) {
          entry.bucketValues[keys[i]!]! += 1;
          return;
        }
      }
    },
  };
}
