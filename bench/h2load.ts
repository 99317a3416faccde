import { execFile, spawnSync } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
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
}

/** h2load's per-connection `--rps` for a total rate over `connections`. */
export function rpsPerConnection(totalRps: number, connections: number): number {
  return Math.max(1, Math.round(totalRps / connections));
}

/** h2load's `--rps` timer ticks at most every 10 ms: at or below this rate a connection sends one request a tick. */
export const ONE_PER_TICK_RPS = 100;

/**
 * How {@link runH2loadEvenly} spreads `totalRps`: over as many single-connection h2load
 * processes as it takes for each to send at most one request per 10 ms tick, the processes'
 * starts staggered over one tick. h2load's `--rps` timer repeats on its own schedule (libev
 * re-arms it from when it was due, so it does not drift) but fires at most every 10 ms and
 * sends what fell due meanwhile at once; and all connections of one h2load tick together. So
 * with several connections per process, or over 100 req/s per connection, requests arrive in
 * bursts (at 2,700 req/s over 10 connections, ~27 every 10 ms). Its `--timing-script-file`
 * would place each request exactly but waits each interval from when the previous request
 * went out, so lateness adds up: measured here, 81 % of the scheduled rate at one request
 * every 3.7 ms, 92 % at 10 ms (bench/results/2026-12-06-p99.md).
 */
export function evenLoad(totalRps: number): { processes: number; rpsEach: number; offeredRps: number } {
  const processes = Math.max(1, Math.ceil(totalRps / ONE_PER_TICK_RPS));
  const rpsEach = Math.max(1, Math.round(totalRps / processes));
  return { processes, rpsEach, offeredRps: processes * rpsEach };
}

/**
 * An open loop of `totalRps` with requests spread rather than in bursts ({@link evenLoad}):
 * single-connection h2load processes, each at most one request per tick, their starts
 * staggered, their requests merged.
 */
export async function runH2loadEvenly(
  options: Omit<H2loadOptions, "rps" | "requests" | "connections">,
  totalRps: number,
): Promise<RawLoad> {
  const { processes, rpsEach } = evenLoad(totalRps);
  const { serverCpuMs, ...rest } = options;
  const tickMs = 1000 / ONE_PER_TICK_RPS;
  const runs = await Promise.all(
    Array.from({ length: processes }, (_, k) =>
      new Promise((r) => setTimeout(r, (k * tickMs) / processes)).then(() =>
        // The server's CPU over the slice once (the first process's window), not once per process.
        runH2load({
          ...rest,
          connections: 1,
          rps: rpsEach,
          ...(k === 0 && serverCpuMs ? { serverCpuMs } : {}),
        }),
      ),
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
    ...(runs[0]?.serverCpuMs !== undefined ? { serverCpuMs: runs[0].serverCpuMs } : {}),
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
  if (options.rps !== undefined) args.push(`--rps=${rpsPerConnection(options.rps, options.connections)}`);
  if (options.requests !== undefined) args.push("-n", String(options.requests));
  else
    args.push(
      "-D",
      `${Math.round((options.durationSeconds ?? 10) * 1000)}ms`,
      "--warm-up-time",
      `${Math.round((options.warmupSeconds ?? 1) * 1000)}ms`,
    );
  for (const [k, v] of Object.entries(options.headers)) args.push("-H", `${k}: ${v}`);
  args.push(options.url);
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
  }
  const summary = parseSummary(stdout);
  const latenciesUs: number[] = [];
  const statuses: Record<string, number> = {};
  let errors = 0;
  for (const line of log.split("\n")) {
    if (!line) continue;
    const [, statusText, usText] = line.split("\t");
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
  const seconds = options.requests !== undefined ? summary.seconds : (options.durationSeconds ?? 10);
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
