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

/** Merge runs of one scenario (rounds) and summarise them. */
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
  const cpuRuns = runs.filter((r) => r.serverCpuMs !== undefined);
  const cpuMs = cpuRuns.reduce((a, r) => a + r.serverCpuMs!, 0);
  const cpuRequests = cpuRuns.reduce((a, r) => a + r.latenciesUs.length, 0);
  return {
    generator: runs[0]!.generator,
    requests: total,
    seconds,
    rps: seconds > 0 ? total / seconds : 0,
    p50Ms: percentile(sorted, 50) / 1000,
    p99Ms: percentile(sorted, 99) / 1000,
    meanMs: total > 0 ? sum / total / 1000 : Number.NaN,
    maxMs: total > 0 ? sorted[total - 1]! / 1000 : Number.NaN,
    errors: runs.reduce((a, r) => a + r.errors, 0),
    statuses,
    cpuUsPerRequest: cpuRequests > 0 ? (cpuMs * 1000) / cpuRequests : null,
  };
}
