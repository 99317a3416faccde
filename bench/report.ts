import { readFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";

/** One row of the results table. */
export interface ScenarioResult {
  /** Stable id, e.g. "jwt-hs256". */
  id: string;
  /** What it measures, e.g. "GetCurrentUser, JWT HS256". */
  label: string;
  protocol: "connect" | "grpc";
  /** "h2load" or "node-http2". */
  generator: string;
  requests: number;
  rps: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  statuses: Record<string, number>;
  /** Server CPU time per request, µs (null when it could not be read). */
  cpuUsPerRequest: number | null;
  /** Throughput over the bare-Connect baseline of the same protocol and generator. */
  ratioToBare: number | null;
  /** Throughput over the raw node:http2 ceiling of the same protocol and generator. */
  ratioToRaw: number | null;
  /** The bare baseline's CPU per request over this scenario's: the throughput ratio a quiet machine would show. */
  cpuRatioToBare: number | null;
  /** Rivals only: throughput over Tessera's JWT HS256 scenario of the same protocol (above 1: the rival serves more). */
  ratioToTessera: number | null;
  /** Rivals only: Tessera's CPU per request (JWT HS256, same protocol) over the rival's (above 1: Tessera spends more per call). */
  cpuRatioToTessera: number | null;
  peakRssMb: number;
  /**
   * Whether a successful response is expected (authenticated scenarios must have zero
   * errors); "rival": another server answering the JWT HS256 call (issue 19).
   */
  kind: "reference" | "authenticated" | "refused" | "login" | "rival";
  note?: string;
}

/** A target of issue 4 and whether this run met it. */
export interface TargetResult {
  target: string;
  measured: string;
  met: boolean;
}

/** The machine the run happened on. */
export interface MachineInfo {
  nproc: number;
  cpuModel: string;
  memoryGiB: number;
  node: string;
  h2load: string;
  platform: string;
  loadAverage?: string;
}

export function describeMachine(h2load: string): MachineInfo {
  let cpuModel = cpus()[0]?.model ?? "unknown";
  try {
    cpuModel = /^model name\s*:\s*(.+)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1] ?? cpuModel;
  } catch {
    // not Linux: keep os.cpus()
  }
  return {
    nproc: cpus().length,
    cpuModel,
    memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    h2load,
    platform: `${process.platform} ${process.arch}`,
  };
}

const fmt = (n: number | null, digits = 0) => (n === null || Number.isNaN(n) ? "–" : n.toFixed(digits));
const pct = (n: number | null) => (n === null || Number.isNaN(n) ? "–" : `${(n * 100).toFixed(0)}%`);

const HEADER = [
  "scenario",
  "protocol",
  "req/s",
  "p50 ms",
  "p99 ms",
  "errors",
  "vs bare",
  "vs raw",
  "vs Tessera",
  "CPU µs/req",
  "peak RSS MiB",
];

function row(r: ScenarioResult): string[] {
  return [
    r.generator === "h2load" ? r.label : `${r.label} †`,
    r.protocol === "connect" ? "Connect JSON" : "gRPC",
    fmt(r.rps, r.rps < 100 ? 1 : 0),
    fmt(r.p50Ms, 2),
    fmt(r.p99Ms, 2),
    String(r.errors),
    pct(r.ratioToBare),
    pct(r.ratioToRaw),
    pct(r.ratioToTessera),
    fmt(r.cpuUsPerRequest),
    fmt(r.peakRssMb),
  ];
}

/** The table for a terminal: aligned columns. */
export function textTable(results: readonly ScenarioResult[]): string {
  const rows = [HEADER, ...results.map(row)];
  const widths = HEADER.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) =>
    r.map((c, i) => (i >= 2 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join("  ");
  return [line(rows[0]!), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

/** The same table in Markdown. */
export function markdownTable(results: readonly ScenarioResult[]): string {
  const align = HEADER.map((_, i) => (i >= 2 ? "---:" : "---"));
  return [HEADER, align, ...results.map(row)].map((r) => `| ${r.join(" | ")} |`).join("\n");
}

/** The targets as a Markdown table. */
export function markdownTargets(targets: readonly TargetResult[]): string {
  return [
    "| target | measured | met |",
    "| --- | --- | --- |",
    ...targets.map((t) => `| ${t.target} | ${t.measured} | ${t.met ? "yes" : "**no**"} |`),
  ].join("\n");
}
