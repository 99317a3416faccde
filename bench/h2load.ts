import { execFile, spawnSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { LoadShape, RawLoad } from "./stats.js";

/** The command that installs h2load on Debian and Ubuntu. */
export const H2LOAD_INSTALL = "apt-get update && apt-get install -y nghttp2-client";

/** The h2load version line, or null when h2load is not on the PATH. */
export function h2loadVersion(): string | null {
  const probe = spawnSync("h2load", ["--version"], { encoding: "utf8" });
  if (probe.error || probe.status !== 0) return null;
  return probe.stdout.trim().split("\n")[0] ?? "h2load";
}

/** One h2load run. */
export interface H2loadOptions extends LoadShape {
  url: string;
  /** File whose bytes are POSTed as every request's body. */
  bodyFile: string;
  /** Where to put the per-request log (deleted after parsing). */
  workDir: string;
  /** CPU list (taskset syntax) h2load runs on; by default the bench process's own. */
  cpus?: string;
  /**
   * Open loop: requests per second over all connections (h2load `--rps`, which is per
   * connection: this total divided by `connections`, rounded, at least 1), instead of
   * keeping `streams` requests in flight on each. h2load then starts a request on every
   * tick whether or not the previous ones have answered; only when all `streams` of a
   * connection are busy does a due request wait, and its latency is then counted from when
   * it was sent, not when it was due (coordinated omission): the caller compares the
   * achieved rate with this one to know the schedule was kept.
   */
  rps?: number;
  /**
   * Open loop on an exact schedule instead of `rps` (h2load `--timing-script-file`): one request
   * every `intervalMs` on each connection, the first at `startMs`, for `warmupSeconds` (not
   * counted) + `durationSeconds`. h2load's `--rps` fires its timer at most every 10 ms and sends
   * the requests due since in one burst (at 500 req/s on a connection, 5 at once every 10 ms);
   * this sends each on its own. Every connection of one run keeps the same schedule: for
   * connections out of phase, run one connection per run with a different `startMs`.
   */
  schedule?: { intervalMs: number; startMs: number };
}

/** h2load's per-connection `--rps` for a total rate over `connections`. */
export function rpsPerConnection(totalRps: number, connections: number): number {
  return Math.max(1, Math.round(totalRps / connections));
}

/**
 * One connection's share of an even schedule of `totalRps` over `connections`: each sends one
 * request every `connections` slots of 1000 / totalRps ms, connection k starting at slot k,
 * so that the requests of all of them arrive one slot apart rather than together.
 */
export function evenSchedules(
  totalRps: number,
  connections: number,
): { intervalMs: number; startMs: number }[] {
  const slotMs = 1000 / totalRps;
  return Array.from({ length: connections }, (_, k) => ({
    intervalMs: slotMs * connections,
    startMs: slotMs * k,
  }));
}

/** h2load's `--timing-script-file` for one schedule over `spanMs`: "offset ms<TAB>url" lines. */
export function timingScript(
  schedule: { intervalMs: number; startMs: number },
  spanMs: number,
  url: string,
): { text: string; count: number } {
  // (less a rounding error: 100 ms at 1000 / 270 ms is 27 requests, not 28)
  const count = Math.max(1, Math.ceil(spanMs / schedule.intervalMs - 1e-9));
  let text = "";
  for (let i = 0; i < count; i++)
    text += `${(schedule.startMs + i * schedule.intervalMs).toFixed(3)}\t${url}\n`;
  return { text, count };
}

/**
 * An open loop of `totalRps` over `connections` with every request on its own slot
 * (`evenSchedules`): one h2load per connection, run together, their requests merged.
 */
export async function runH2loadEvenly(
  options: Omit<H2loadOptions, "rps" | "schedule" | "requests" | "connections">,
  totalRps: number,
  connections: number,
): Promise<RawLoad> {
  const runs = await Promise.all(
    evenSchedules(totalRps, connections).map((schedule) =>
      runH2load({ ...options, connections: 1, schedule }),
    ),
  );
  const statuses: Record<string, number> = {};
  for (const r of runs) for (const [k, n] of Object.entries(r.statuses)) statuses[k] = (statuses[k] ?? 0) + n;
  return {
    generator: "h2load",
    latenciesUs: runs.flatMap((r) => r.latenciesUs),
    seconds: options.durationSeconds ?? 10,
    errors: runs.reduce((n, r) => n + r.errors, 0),
    statuses,
  };
}

/** Runs started so far: several may run at once (one per instance of a fleet), each with its own log. */
let runs = 0;

/**
 * Run h2load over HTTP/2 + TLS and compute the statistics from its per-request log
 * (`--log-file`: start time, status, microseconds), since h2load itself prints only
 * min/max/mean/sd. A response with another status than expected, a failed stream
 * (status -1) or an h2load-reported error counts as an error.
 *
 * Rows with status 0 are requests whose response headers arrived during the warm-up
 * phase but whose stream ended in the measured phase; h2load counts them as done and
 * succeeded. They are counted as requests (their latency is real) but not as errors.
 */
export async function runH2load(options: H2loadOptions): Promise<RawLoad> {
  const logFile = join(options.workDir, `h2load-${process.pid}-${Date.now()}-${++runs}.log`);
  const args = [
    "-c",
    String(options.connections),
    "-m",
    String(options.streams),
    "-d",
    options.bodyFile,
    "--log-file",
    logFile,
  ];
  const schedule = options.schedule;
  const warmupMs = (options.warmupSeconds ?? 1) * 1000;
  if (schedule) {
    // The script sets the requests and their number; h2load has no warm-up phase then.
    const scriptFile = `${logFile}.script`;
    const script = timingScript(schedule, warmupMs + (options.durationSeconds ?? 10) * 1000, options.url);
    writeFileSync(scriptFile, script.text);
    args.push("--timing-script-file", scriptFile, "-n", String(script.count));
  } else {
    if (options.rps !== undefined) args.push(`--rps=${rpsPerConnection(options.rps, options.connections)}`);
    if (options.requests !== undefined) args.push("-n", String(options.requests));
    else
      args.push(
        "-D",
        `${Math.round((options.durationSeconds ?? 10) * 1000)}ms`,
        "--warm-up-time",
        `${Math.round((options.warmupSeconds ?? 1) * 1000)}ms`,
      );
  }
  for (const [k, v] of Object.entries(options.headers)) args.push("-H", `${k}: ${v}`);
  if (!schedule) args.push(options.url);
  const [command, argv]: [string, string[]] = options.cpus
    ? ["taskset", ["-c", options.cpus, "h2load", ...args]]
    : ["h2load", args];
  let cpuAtStart: number | undefined;
  const warmup = options.requests === undefined ? (options.warmupSeconds ?? 1) : 0;
  const cpuTimer = options.serverCpuMs
    ? setTimeout(() => {
        cpuAtStart = options.serverCpuMs!();
      }, warmup * 1000)
    : undefined;
  const stdout = await new Promise<string>((resolve, reject) => {
    execFile(command, argv, { maxBuffer: 16 * 1024 * 1024 }, (err, out, errOut) => {
      if (err && !out) reject(new Error(`h2load failed: ${err.message}\n${errOut}`));
      else resolve(out);
    });
  });
  clearTimeout(cpuTimer);
  const cpuAtEnd = options.serverCpuMs?.();
  let log = "";
  try {
    log = readFileSync(logFile, "utf8");
  } finally {
    rmSync(logFile, { force: true });
    if (schedule) rmSync(`${logFile}.script`, { force: true });
  }
  // On a schedule there is no warm-up phase in h2load: the requests started in its first
  // `warmupSeconds` are left out here (the log's first column is the start, µs since the epoch).
  let from = 0;
  if (schedule) {
    for (const line of log.split("\n")) {
      const start = Number(line.split("\t")[0]);
      if (line && (from === 0 || start < from)) from = start;
    }
    from += warmupMs * 1000;
  }
  const summary = parseSummary(stdout);
  const latenciesUs: number[] = [];
  const statuses: Record<string, number> = {};
  let errors = 0;
  for (const line of log.split("\n")) {
    if (!line) continue;
    const [startText, statusText, usText] = line.split("\t");
    if (schedule && Number(startText) < from) continue;
    const status = Number(statusText);
    const us = Number(usText);
    statuses[String(status)] = (statuses[String(status)] ?? 0) + 1;
    if (status === -1 || (status !== 0 && status !== options.expectStatus)) errors++;
    if (status !== -1 && Number.isFinite(us)) latenciesUs.push(us);
  }
  // Errored or timed-out requests h2load did not log as failed streams.
  errors = Math.max(errors, summary.errored + summary.timeout);
  if (summary.done === 0 && latenciesUs.length === 0) {
    throw new Error(`h2load completed no request against ${options.url}:\n${stdout}`);
  }
  const seconds =
    options.requests !== undefined && !schedule ? summary.seconds : (options.durationSeconds ?? 10);
  return {
    generator: "h2load",
    latenciesUs,
    seconds,
    errors,
    statuses,
    ...(cpuAtStart !== undefined && cpuAtEnd !== undefined ? { serverCpuMs: cpuAtEnd - cpuAtStart } : {}),
  };
}

interface H2loadSummary {
  seconds: number;
  done: number;
  errored: number;
  timeout: number;
}

/** The "finished in" and "requests:" lines of h2load's report. */
export function parseSummary(stdout: string): H2loadSummary {
  const finished = /finished in ([\d.]+)(m?s)/.exec(stdout);
  const requests =
    /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(
      stdout,
    );
  if (!finished || !requests) throw new Error(`unexpected h2load output:\n${stdout}`);
  const seconds = Number(finished[1]) / (finished[2] === "ms" ? 1000 : 1);
  return { seconds, done: Number(requests[3]), errored: Number(requests[6]), timeout: Number(requests[7]) };
}
