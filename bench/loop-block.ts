/**
 * What holds a Tessera server's event loop, piece by piece, under a fixed-rate load (issue 22's
 * p99 target): the server runs with a probe loaded before it (`node --import`), which records
 *
 * - the event loop's delay (`monitorEventLoopDelay`, 1 ms resolution): its p99 and its longest stall;
 * - every synchronous write (`fs.writeSync`) by the event loop: per file descriptor, how long
 *   each took, how many failed with EAGAIN (a non-blocking stderr whose pipe is full), and the
 *   synchronous sleeps (`Atomics.wait`) that follow one (SonicBoom sleeps 100 ms, then retries);
 * - every SQLite statement run on the event loop (better-sqlite3's `run`): the audit inserts
 *   apart, with their rows per insert and the time each held the loop;
 * - garbage collections (a `gc` PerformanceObserver): count and pause per kind, the longest;
 * - every HTTP/2 stream's arrival (the server's 'stream' event) and close: the server's own
 *   latency (`serverStreams`), how many requests arrived during each stall (`arrived`) and
 *   within 0.2 ms of the one before (a burst), and the CPU per stream of the process and of
 *   the event loop thread (`cpu`);
 * - with `--env LOOP_PROBE_ALL_STALLS=1`, every stall (not only the longest 12) and every
 *   stream (arrival, ms to close), each stall also stamped `monoUs` on the monotonic clock of a
 *   `--node-arg=--cpu-prof` profile's timestamps, to find what ran then.
 *
 * `--spacing rps` (the default, as `npm run bench`) drives the rate with h2load's `--rps`,
 * whose timer fires at most every 10 ms and sends the requests due since together (at 500
 * req/s over one connection, 5 at once every 10 ms; over 10 connections, their ticks about
 * aligned, most of a 10 ms share at once); `--spacing even` spreads them (one h2load per
 * 100 req/s, one connection and one request per tick each, starts staggered; `--connections`
 * is then ignored; see `evenLoad`). 2026-12-06-p99.md has what that changes.
 *
 * The server's stderr is a pipe read by this process, as in `npm run bench` (and as under a
 * container runtime or journald): a reader that falls behind fills it. Wall-clock figures
 * depend on the machine's load; the per-piece times (a write, an insert of N rows, a GC pause)
 * much less so, and they name the cause.
 *
 *   npx tsx bench/loop-block.ts --root <checkout> [--scenario verify-pat|pat] [--protocol connect|grpc]
 *     [--rate 2700] [--connections 10] [--spacing rps|even] [--seconds 10] [--warmup 20000]
 *     [--build <dir>] [--env NAME=value …]
 *
 *     [--node-arg --trace-gc … --stdout <file>]
 *
 * Prints one JSON object: h2load's latencies (p50, p99, max) and the probe's figures.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { create, toBinary } from "@bufbuild/protobuf";
import { VerifyCredentialRequestSchema } from "../gen/tessera/v1/verification_service_pb.js";
import { ensureDevCertificates } from "../src/certs/dev-ca.js";
import { compileForBench, type Launcher } from "./build.js";
import { JsonClient } from "./client.js";
import { grpcFrame } from "./fixtures.js";
import { runH2load, runH2loadEvenly } from "./h2load.js";
import { benchServerEnv, startServerProcess } from "./processes.js";
import { percentile } from "./stats.js";

const { values: flags } = parseArgs({
  options: {
    root: { type: "string" },
    scenario: { type: "string", default: "verify-pat" },
    protocol: { type: "string", default: "connect" },
    rate: { type: "string", default: "2700" },
    seconds: { type: "string", default: "10" },
    warmup: { type: "string", default: "20000" },
    connections: { type: "string", default: "10" },
    /** rps: h2load's --rps (bursts every 10 ms); even: spread out (bench/h2load.ts evenLoad). */
    spacing: { type: "string", default: "rps" },
    build: { type: "string" },
    out: { type: "string" },
    env: { type: "string", multiple: true },
    /** A Node or V8 option for the server (e.g. --trace-gc, --single-threaded-gc). */
    "node-arg": { type: "string", multiple: true },
    /** Where the server's stdout goes (--trace-gc prints there) instead of this process's pipe. */
    stdout: { type: "string" },
  },
});
if (!flags.root) throw new Error("--root <checkout> is required");
const root = resolve(flags.root);
const protocol = flags.protocol as "connect" | "grpc";
const verifying = flags.scenario === "verify-pat";
const work = flags.out ? resolve(flags.out) : mkdtempSync(join(tmpdir(), "tessera-loop-block-"));
mkdirSync(work, { recursive: true });
const log = (text: string) => process.stderr.write(`${text}\n`);

/** The probe, plain JavaScript loaded by the server before its own code (`--import`). */
const PROBE = `
import fs from "node:fs";
import http2 from "node:http2";
import { createRequire } from "node:module";
import { monitorEventLoopDelay, PerformanceObserver } from "node:perf_hooks";
import { isMainThread } from "node:worker_threads";

if (isMainThread) {
  const out = process.env.LOOP_PROBE_OUT;
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  let s;
  // The event loop thread's time on a CPU and waiting for one (ms), from the kernel.
  const schedFd = fs.openSync("/proc/thread-self/schedstat", "r");
  const schedBuf = Buffer.alloc(128);
  const sched = () => {
    const n = fs.readSync(schedFd, schedBuf, 0, 128, 0);
    const [onCpu, waiting] = schedBuf.toString("latin1", 0, n).split(" ");
    return { cpu: Number(onCpu) / 1e6, wait: Number(waiting) / 1e6 };
  };
  const piece = () => ({ n: 0, totalMs: 0, maxMs: 0, over1ms: 0, samples: [] });
  let cpuAtReset = process.cpuUsage();
  let loopAtReset = sched();
  let wallAtReset = performance.now();
  const reset = () => {
    cpuAtReset = process.cpuUsage();
    loopAtReset = sched();
    wallAtReset = performance.now();
    delay.reset();
    s = { writes: {}, eagain: 0, sleeps: piece(), audit: piece(), auditCpu: 0, auditWait: 0, auditBlocked: 0, auditMaxBlocked: 0, auditMaxCpu: 0, auditRows: 0, auditMaxRows: 0, otherRuns: piece(), gc: {}, stalls: [], spans: [], streams: [] };
  };
  // Stalls: a 1 ms timer's late ticks, with the process's CPU time (all threads) during each:
  // a stall the process spent on the CPU is its own work, one it did not is the machine's.
  let lastTick = performance.now();
  // The same instant on the monotonic clock in µs, the clock of a --cpu-prof profile's timestamps.
  let lastMono = process.hrtime.bigint();
  let lastCpu = process.cpuUsage();
  let lastSched = sched();
  setInterval(() => {
    const now = performance.now();
    const cpu = process.cpuUsage();
    const gap = now - lastTick;
    if (gap > 3 && s.stalls.length < 5000) {
      const t = sched();
      s.stalls.push({
        at: lastTick,
        monoUs: Number(lastMono / 1000n),
        gapMs: gap,
        cpuMs: (cpu.user + cpu.system - lastCpu.user - lastCpu.system) / 1000,
        loopCpuMs: t.cpu - lastSched.cpu,
        loopRunqueueMs: t.wait - lastSched.wait,
      });
    }
    lastTick = now;
    lastMono = process.hrtime.bigint();
    lastCpu = cpu;
    lastSched = sched();
  }, 1).unref();
  /** What ran when: pieces over 1 ms, to lay against the stalls. */
  const span = (what, start, ms, extra) => {
    if (ms > 1 && s.spans.length < 20000) s.spans.push({ what, at: start, ms, ...extra });
  };
  const add = (p, ms) => {
    p.n++;
    p.totalMs += ms;
    if (ms > p.maxMs) p.maxMs = ms;
    if (ms > 1) p.over1ms++;
    if (p.samples.length < 200000) p.samples.push(ms);
  };
  reset();

  const writeSync = fs.writeSync;
  fs.writeSync = function (fd, ...rest) {
    const t = performance.now();
    try {
      return writeSync.call(this, fd, ...rest);
    } catch (err) {
      if (err && err.code === "EAGAIN") s.eagain++;
      throw err;
    } finally {
      add((s.writes[fd] ??= piece()), performance.now() - t);
    }
  };
  const wait = Atomics.wait;
  Atomics.wait = function (...args) {
    const t = performance.now();
    try {
      return wait.apply(this, args);
    } finally {
      add(s.sleeps, performance.now() - t);
    }
  };

  try {
    const require = createRequire(process.env.LOOP_PROBE_FROM);
    const Database = require("better-sqlite3");
    const db = new Database(":memory:");
    const proto = Object.getPrototypeOf(db.prepare("select 1"));
    db.close();
    const run = proto.run;
    const rows = new WeakMap();
    proto.run = function (...args) {
      const t = performance.now();
      const before = sched();
      try {
        return run.apply(this, args);
      } finally {
        const ms = performance.now() - t;
        if (this.source.startsWith("insert into audit_events")) {
          let n = rows.get(this);
          if (n === undefined) rows.set(this, (n = this.source.split("(?").length - 1));
          add(s.audit, ms);
          const after = sched();
          const cpu = after.cpu - before.cpu;
          const wait = after.wait - before.wait;
          s.auditCpu += cpu;
          s.auditWait += wait;
          s.auditBlocked += Math.max(0, ms - cpu - wait);
          if (ms - cpu - wait > s.auditMaxBlocked) s.auditMaxBlocked = ms - cpu - wait;
          if (cpu > s.auditMaxCpu) s.auditMaxCpu = cpu;
          span("audit insert of " + n, t, ms, { cpu, wait });
          s.auditRows += n;
          if (n > s.auditMaxRows) s.auditMaxRows = n;
        } else add(s.otherRuns, ms);
      }
    };
  } catch (err) {
    process.stderr.write("loop probe: better-sqlite3 not wrapped: " + err.message + "\\n");
  }

  // Each HTTP/2 stream's arrival (the session's 'stream' event) and close, on the server's clock:
  // the server's own latency, and how requests arrive (one by one, or in bursts).
  const createSecureServer = http2.createSecureServer;
  http2.createSecureServer = function (...args) {
    const server = createSecureServer.apply(this, args);
    server.on("stream", (stream) => {
      const t = performance.now();
      stream.once("close", () => {
        if (s.streams.length < 200000) s.streams.push(t, performance.now() - t);
      });
    });
    return server;
  };

  const KINDS = { 1: "scavenge", 2: "mark-compact", 4: "incremental", 8: "weak-callbacks" };
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      const kind = KINDS[e.detail?.kind ?? e.kind] ?? String(e.detail?.kind);
      add((s.gc[kind] ??= piece()), e.duration);
      span("gc " + kind, e.startTime, e.duration);
    }
  }).observe({ entryTypes: ["gc"] });

  const summary = (p) => {
    const sorted = Float64Array.from(p.samples).sort();
    const at = (q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((q / 100) * sorted.length))] : 0);
    return { n: p.n, meanMs: p.n ? p.totalMs / p.n : 0, p99Ms: at(99), maxMs: p.maxMs, over1ms: p.over1ms, totalMs: p.totalMs };
  };
  process.on("SIGUSR2", () => {
    const flags = (() => {
      try {
        return /flags:\\s+(\\d+)/.exec(fs.readFileSync("/proc/self/fdinfo/2", "utf8"))[1];
      } catch {
        return null;
      }
    })();
    // Each stall (over 3 ms late) against the pieces that overlap it.
    const stalls = s.stalls.map((st) => {
      const parts = s.spans.filter((p) => p.at < st.at + st.gapMs && p.at + p.ms > st.at);
      return { ...st, parts: parts.map((p) => p.what + " " + p.ms.toFixed(1) + " ms" + (p.cpu !== undefined ? " (cpu " + p.cpu.toFixed(1) + ", runqueue " + p.wait.toFixed(1) + ")" : "")) };
    });
    const byCause = {};
    for (const st of stalls) {
      const key = st.parts.length ? [...new Set(st.parts.map((p) => p.replace(/ [\\d.]+ ms.*$/, "").replace(/of \\d+/, "")))].join(" + ") : (st.cpuMs < st.gapMs / 2 ? "nothing of ours (off the CPU)" : "other work of ours");
      const c = (byCause[key] ??= { stalls: 0, totalMs: 0, maxMs: 0, cpuMs: 0, loopCpuMs: 0, loopRunqueueMs: 0 });
      c.stalls++;
      c.loopCpuMs += st.loopCpuMs;
      c.loopRunqueueMs += st.loopRunqueueMs;
      c.totalMs += st.gapMs;
      c.cpuMs += st.cpuMs;
      c.maxMs = Math.max(c.maxMs, st.gapMs);
    }
    // Requests arriving during each stall; arrivals closer than 0.2 ms to the one before (a burst).
    const arrivals = Float64Array.from(s.streams.filter((_, i) => i % 2 === 0)).sort();
    const before = (t) => {
      let lo = 0;
      let hi = arrivals.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (arrivals[mid] < t) lo = mid + 1;
        else hi = mid;
      }
      return lo;
    };
    for (const st of stalls) st.arrived = before(st.at + st.gapMs) - before(st.at);
    let burst = 0;
    for (let i = 1; i < arrivals.length; i++) if (arrivals[i] - arrivals[i - 1] < 0.2) burst++;
    const serverMs = Float64Array.from(s.streams.filter((_, i) => i % 2 === 1)).sort();
    const q = (p) => (serverMs.length ? serverMs[Math.min(serverMs.length - 1, Math.floor((p / 100) * serverMs.length))] : 0);
    const longest = [...stalls].sort((a, b) => b.gapMs - a.gapMs).slice(0, 12);
    const result = {
      stderrNonBlocking: flags === null ? null : (parseInt(flags, 8) & 0o4000) !== 0,
      loopDelay: {
        p50Ms: delay.percentile(50) / 1e6,
        p99Ms: delay.percentile(99) / 1e6,
        p999Ms: delay.percentile(99.9) / 1e6,
        maxMs: delay.max / 1e6,
      },
      writes: Object.fromEntries(Object.entries(s.writes).map(([fd, p]) => ["fd" + fd, summary(p)])),
      eagain: s.eagain,
      syncSleeps: summary(s.sleeps),
      auditInserts: {
        ...summary(s.audit),
        rows: s.auditRows,
        maxRows: s.auditMaxRows,
        // Of the wall time: on the CPU, waiting for one, and neither (blocked: I/O, a lock, a busy wait's sleep).
        cpuMs: s.auditCpu,
        runqueueMs: s.auditWait,
        blockedMs: s.auditBlocked,
        maxCpuMs: s.auditMaxCpu,
        maxBlockedMs: s.auditMaxBlocked,
      },
      otherStatements: summary(s.otherRuns),
      gc: Object.fromEntries(Object.entries(s.gc).map(([k, p]) => [k, summary(p)])),
      heap: (() => { const m = process.memoryUsage(); return { rssMb: m.rss / 2 ** 20, heapUsedMb: m.heapUsed / 2 ** 20, heapTotalMb: m.heapTotal / 2 ** 20 }; })(),
      // CPU since the reset: the process (all threads) and the event loop thread alone, per stream.
      cpu: (() => {
        const c = process.cpuUsage(cpuAtReset);
        const l = sched();
        const n = serverMs.length || 1;
        return {
          wallMs: performance.now() - wallAtReset,
          processMs: (c.user + c.system) / 1000,
          loopMs: l.cpu - loopAtReset.cpu,
          loopRunqueueMs: l.wait - loopAtReset.wait,
          processUsPerStream: ((c.user + c.system) / n),
          loopUsPerStream: ((l.cpu - loopAtReset.cpu) * 1000) / n,
        };
      })(),
      // Arrival of a stream to its close, in the server; and how many arrived within 0.2 ms of another.
      serverStreams: { n: serverMs.length, p50Ms: q(50), p99Ms: q(99), maxMs: serverMs.at(-1) ?? 0, within200us: burst },
      stallsByCause: byCause,
      longestStalls: longest,
      ...(process.env.LOOP_PROBE_ALL_STALLS ? { stalls, streams: s.streams } : {}),
    };
    fs.writeFileSync(out, JSON.stringify(result));
    reset();
    // This handler's own work (sorting and writing the figures) is no stall of the server's.
    lastTick = performance.now();
    lastMono = process.hrtime.bigint();
    lastCpu = process.cpuUsage();
    lastSched = sched();
  });
}
`;

const probeFile = join(work, "loop-probe.mjs");
writeFileSync(probeFile, PROBE);
const probeOut = join(work, "loop-probe.json");

const buildDir = flags.build ? resolve(flags.build) : join(work, "build");
let launcher: Launcher;
if (existsSync(join(buildDir, "dist", "src", "main.js")))
  launcher = {
    runtime: "compiled",
    command: process.execPath,
    args: (entry) => [join(buildDir, "dist", entry.replace(/\.ts$/, ".js"))],
    cwd: buildDir,
  };
else {
  log(`compiling ${root}…`);
  launcher = compileForBench(root, buildDir).launcher;
}

// As npm run bench: the server on the last CPU, this process and h2load on the others.
const cpus = availableParallelism();
const pinned = cpus >= 2 && spawnSync("taskset", ["-V"]).status === 0;
const serverCpu = pinned ? String(cpus - 1) : undefined;
const loadCpus = pinned ? `0-${cpus - 2}` : undefined;
if (loadCpus) spawnSync("taskset", ["-a", "-p", "-c", loadCpus, String(process.pid)], { stdio: "ignore" });

const certDir = join(work, "certs");
await ensureDevCertificates(certDir);
const tls = { ca: readFileSync(join(certDir, "ca.crt")) };
const dataDir = join(work, `data-${Date.now()}`);
mkdirSync(dataDir, { recursive: true });
const adminPassword = randomBytes(18).toString("base64url");
const env = benchServerEnv(
  { dataDir, certDir, adminPassword },
  {
    TESSERA_JWT_SECRET: randomBytes(32).toString("base64url"),
    LOOP_PROBE_OUT: probeOut,
    LOOP_PROBE_FROM: join(buildDir, "package.json"),
    ...Object.fromEntries(
      (flags.env ?? []).map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
    ),
  },
);
const serverArgs = [
  ...(flags["node-arg"] ?? []),
  "--import",
  pathToFileURL(probeFile).href,
  ...launcher.args("src/main.ts"),
  "serve",
];
const quote = (a: string) => `'${a.replaceAll("'", "'\\''")}'`;
const server = await startServerProcess({
  name: "tessera",
  // With --stdout, through a shell that execs the server (the same pid) with stdout in that file.
  ...(flags.stdout
    ? {
        command: "sh",
        args: [
          "-c",
          `exec ${[launcher.command, ...serverArgs].map(quote).join(" ")} >${quote(resolve(flags.stdout))}`,
        ],
      }
    : { command: launcher.command, args: serverArgs }),
  cwd: launcher.cwd,
  cpus: serverCpu,
  env,
  ready: (line) => {
    if (!line.startsWith("{")) return null;
    try {
      const e = JSON.parse(line) as { msg?: string; url?: string };
      return e.msg === "tessera listening" && e.url ? e.url : null;
    } catch {
      return null;
    }
  },
});

try {
  const api = new JsonClient(server.url, tls);
  const bearer = (t: string) => ({ authorization: `Bearer ${t}` });
  const admin = await api.call<{ accessToken: string }>("tessera.v1.UserService/Login", {
    username: "admin",
    password: adminPassword,
  });
  const user = { username: "bench-user", password: randomBytes(18).toString("base64url") };
  await api.call(
    "tessera.v1.UserService/CreateUser",
    { ...user, scopes: ["bench:read"] },
    bearer(admin.accessToken),
  );
  const jwt = (await api.call<{ accessToken: string }>("tessera.v1.UserService/Login", user)).accessToken;
  const pat = (
    await api.call<{ token: string }>(
      "tessera.v1.TokenService/CreatePersonalAccessToken",
      { name: "bench" },
      bearer(jwt),
    )
  ).token;
  const verifier = verifying
    ? (
        await api.call<{ token: string }>(
          "tessera.v1.MachineUserService/CreateMachineUser",
          { name: "bench-verifier", authType: "MACHINE_AUTH_TYPE_BEARER", scopes: ["auth:verify"] },
          bearer(admin.accessToken),
        )
      ).token
    : "";
  await api.close();

  const bodyFile = join(work, `body.${protocol}`);
  const input = { credential: pat };
  if (protocol === "connect") writeFileSync(bodyFile, verifying ? JSON.stringify(input) : "{}");
  else
    writeFileSync(
      bodyFile,
      grpcFrame(
        verifying
          ? toBinary(VerifyCredentialRequestSchema, create(VerifyCredentialRequestSchema, input))
          : new Uint8Array(),
      ),
    );
  const shape = {
    url: `${server.url}/${verifying ? "tessera.v1.VerificationService/VerifyCredential" : "tessera.v1.UserService/GetCurrentUser"}`,
    bodyFile,
    workDir: work,
    headers: {
      ...(protocol === "connect"
        ? { "content-type": "application/json" }
        : { "content-type": "application/grpc", te: "trailers" }),
      ...bearer(verifying ? verifier : pat),
    },
    expectStatus: 200,
    ...(loadCpus ? { cpus: loadCpus } : {}),
  };
  log(`warm-up: ${flags.warmup} requests, closed loop`);
  await runH2load({ ...shape, connections: 2, streams: 10, requests: Number(flags.warmup) });
  process.kill(server.pid, "SIGUSR2"); // reset the probe
  await new Promise((r) => setTimeout(r, 200));
  const rate = Number(flags.rate);
  const connections = Number(flags.connections);
  log(`fixed rate: ${rate} req/s over ${connections} connections for ${flags.seconds} s`);
  const load =
    flags.spacing === "even"
      ? await runH2loadEvenly(
          { ...shape, streams: 64, durationSeconds: Number(flags.seconds), warmupSeconds: 1 },
          rate,
        )
      : await runH2load({
          ...shape,
          connections,
          streams: 64,
          rps: rate,
          durationSeconds: Number(flags.seconds),
          warmupSeconds: 1,
        });
  process.kill(server.pid, "SIGUSR2");
  await new Promise((r) => setTimeout(r, 300));
  const probe = JSON.parse(readFileSync(probeOut, "utf8")) as unknown;
  const sorted = Float64Array.from(load.latenciesUs).sort();
  const load1 = readFileSync("/proc/loadavg", "utf8").split(" ")[0];
  process.stdout.write(
    `${JSON.stringify(
      {
        root,
        scenario: flags.scenario,
        protocol,
        rate,
        connections,
        spacing: flags.spacing,
        loadAverage: Number(load1),
        achievedRps: Math.round(load.latenciesUs.length / load.seconds),
        errors: load.errors,
        p50Ms: percentile(sorted, 50) / 1000,
        p99Ms: percentile(sorted, 99) / 1000,
        maxMs: (sorted.at(-1) ?? 0) / 1000,
        probe,
      },
      null,
      1,
    )}\n`,
  );
} finally {
  await server.stop();
}
