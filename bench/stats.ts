/** The load either generator applies (h2load, bench/node-load.ts), and what it checks. */
export interface LoadShape {
  headers: Record<string, string>;
  /** HTTP/2 connections (sessions) … */
  connections: number;
  /** … each with this many requests in flight. */
  streams: number;
  /** Measure for this many seconds (after `warmupSeconds`) … */
  durationSeconds?: number;
  warmupSeconds?: number;
  /** … or send exactly this many requests (no warm-up). */
  requests?: number;
  /** HTTP status every response must have (a refusal scenario expects 401). */
  expectStatus: number;
  /** The server's CPU time so far (ms), read when the measured phase starts and ends. */
  serverCpuMs?: () => number;
}

/** What one load run observed, before summarising (runs of one scenario are merged). */
export interface RawLoad {
  /** Which generator drove the load: "h2load" or "node-http2". */
  generator: string;
  /** Per-request latency of the measured phase, in microseconds. */
  latenciesUs: number[];
  /** Length of the measured phase. */
  seconds: number;
  errors: number;
  /** Count of responses per HTTP status (0: status seen in h2load's warm-up, -1: failed stream). */
  statuses: Record<string, number>;
  /** CPU time the server process used during the measured phase (user + system), in ms. */
  serverCpuMs?: number;
  /** When the run started (epoch ms): pairs a scenario's slice with the nearest baseline slice. */
  startedAt?: number;
}

/** Requests per second of one run. */
export function runRps(run: RawLoad): number {
  return run.seconds > 0 ? run.latenciesUs.length / run.seconds : 0;
}

/** Server CPU µs per request of one run, or null. */
export function runCpuUs(run: RawLoad): number | null {
  return run.serverCpuMs !== undefined && run.latenciesUs.length > 0
    ? (run.serverCpuMs * 1000) / run.latenciesUs.length
    : null;
}

/**
 * A scenario against a baseline, slice by slice: each of the scenario's runs is divided by
 * the baseline run that started nearest to it in time, and the median of those ratios is
 * returned. On a machine whose speed drifts (other tenants, CPU frequency), a slice and its
 * nearest baseline slice saw the same machine; whole-run averages did not.
 */
export function pairedRatio(
  runs: readonly RawLoad[],
  baseline: readonly RawLoad[],
  value: (run: RawLoad) => number | null,
  invert = false,
): number | null {
  const ratios: number[] = [];
  for (const run of runs) {
    let nearest: RawLoad | undefined;
    for (const b of baseline) {
      if (
        nearest === undefined ||
        Math.abs((b.startedAt ?? 0) - (run.startedAt ?? 0)) <
          Math.abs((nearest.startedAt ?? 0) - (run.startedAt ?? 0))
      )
        nearest = b;
    }
    if (!nearest) continue;
    const a = value(run);
    const b = value(nearest);
    if (a === null || b === null || a <= 0 || b <= 0) continue;
    ratios.push(invert ? b / a : a / b);
  }
  return ratios.length > 0 ? median(ratios) : null;
}

/** What a scenario measured. */
export interface LoadResult {
  generator: string;
  requests: number;
  seconds: number;
  rps: number;
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
  maxMs: number;
  errors: number;
  statuses: Record<string, number>;
  /** Server CPU time per request (µs): robust to other processes competing for the machine. */
  cpuUsPerRequest: number | null;
}

/** Nearest-rank percentile of sorted values. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1]!;
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/**
 * Merge runs of one scenario (rounds) and summarise them. Latency percentiles come from
 * all requests of all rounds; requests/s and CPU per request are the median of the
 * rounds, so that a slow spell of the machine during one slice does not decide a ratio.
 */
export function summarize(runs: readonly RawLoad[]): LoadResult {
  if (runs.length === 0) throw new Error("nothing to summarise");
  let total = 0;
  for (const r of runs) total += r.latenciesUs.length;
  const sorted = new Float64Array(total);
  let at = 0;
  for (const r of runs) {
    sorted.set(r.latenciesUs, at);
    at += r.latenciesUs.length;
  }
  sorted.sort();
  let sum = 0;
  for (const v of sorted) sum += v;
  const seconds = runs.reduce((a, r) => a + r.seconds, 0);
  const statuses: Record<string, number> = {};
  for (const r of runs) for (const [k, v] of Object.entries(r.statuses)) statuses[k] = (statuses[k] ?? 0) + v;
  const cpuRuns = runs.filter((r) => r.serverCpuMs !== undefined && r.latenciesUs.length > 0);
  return {
    generator: runs[0]!.generator,
    requests: total,
    seconds,
    rps: median(runs.map(runRps)),
    p50Ms: percentile(sorted, 50) / 1000,
    p99Ms: percentile(sorted, 99) / 1000,
    meanMs: total > 0 ? sum / total / 1000 : Number.NaN,
    maxMs: total > 0 ? sorted[total - 1]! / 1000 : Number.NaN,
    errors: runs.reduce((a, r) => a + r.errors, 0),
    statuses,
    cpuUsPerRequest:
      cpuRuns.length > 0 ? median(cpuRuns.map((r) => (r.serverCpuMs! * 1000) / r.latenciesUs.length)) : null,
  };
}
