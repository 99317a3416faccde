/**
 * Server work per request counted in instructions (valgrind's callgrind), or profiled with
 * V8's `--cpu-prof`, for an A/B of two checkouts that the shared VM's noise cannot blur.
 *
 * Why: CPU time per request on this VM drifts by ±15 % and more between runs (other
 * engineers' builds and tests share its two cores), which hides a 5 % regression. An
 * instruction count of the server process (every thread: event loop, JIT compilers, GC)
 * over a fixed number of requests, after a warm-up, does not depend on what else runs.
 * It is not time (a cache miss costs more than an add), so it complements, not replaces,
 * `npm run bench`.
 *
 *   npx tsx bench/instructions.ts --root <checkout> [--limits] [--tool callgrind|cpu-prof|strace|gc|none]
 *     [--scenarios jwt,pat,api-key,mu-bearer,mu-basic,refused,verify-pat,login-shed] [--protocols connect,grpc] [--warmup 3000] [--requests 3000]
 *     [--out <dir>] [--build <dir>: compile into it once, reuse it after] [--iterations <n>: PBKDF2]
 *     [--env NAME=value …: a setting of the served checkout, e.g. TESSERA_LOG_ACCESS=off]
 *     [--transport fast|connect: server.transport]
 *     [--main-thread: count the event loop's thread alone (callgrind --separate-threads)]
 *     [--keep: keep the callgrind dumps in --out, one per scenario and protocol, for callgrind_annotate]
 *     [--heap-profile: with --tool gc, a sampling heap profile per scenario and protocol in --out]
 *     [--settle-gc: with --tool callgrind, a full collection of the server's heap just before each measured window;
 *       its counts compare only with other --settle-gc counts (the window re-warms code the collection dropped)]
 *     [--node-arg <flag> …: a Node or V8 flag for the served process, e.g. --trace-opt, which
 *      NODE_OPTIONS refuses] [--server-log <file>: the server's output lines, e.g. V8's traces]
 *
 * Scenarios: `jwt` and `pat` (GetCurrentUser with either credential), `api-key` (GetCurrentUser
 * with X-API-Key), `mu-bearer` and `mu-basic` (CheckAuthentication as a machine user with its
 * token or its Basic pair), `refused` (a forged JWT), `verify-pat`; `rival-fastify` (Connect
 * JSON) and `rival-grpc-js` (gRPC): issue 19's rivals (bench/rival-*.ts, as `npm run bench`
 * starts them) under the same tool, answering the same JWT call over the same TLS with the same
 * load, so that Tessera's instructions per call are compared with theirs; and `login-shed`: a
 * wrong-password Login refused because the hash pool is full (issue 18's flood: one slot, no
 * queue, one hash always running, so every other Login is a refusal). The hashes themselves
 * run on other threads: measure that one with --main-thread, which is what the flood takes
 * from the event loop.
 *
 * The checkout is compiled with its own TypeScript (as `npm run bench` does) and served from
 * a fresh SQLite database; this script's own client drives it with h2load over TLS, so two
 * checkouts are measured by the same load. Prints one JSON line per scenario and protocol.
 * `--tool none` serves it plainly and reports only the server's CPU µs per request (from
 * /proc): two checkouts run at the same time that way share whatever else loads the VM.
 * `--tool strace` counts the server's system calls per request (`perf trace -s`, every
 * thread, attached after the warm-up and detached after the measured requests): the kernel work
 * callgrind does not see, where issue 19's gap to fastify was found.
 * `--tool gc` reports the JavaScript heap bytes allocated per request and those promoted to
 * the old generation (bench/gc-probe.ts), which do not depend on the machine's load either.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  createWriteStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { create, toBinary } from "@bufbuild/protobuf";
import { LoginRequestSchema } from "../gen/tessera/v1/user_service_pb.js";
import { VerifyCredentialRequestSchema } from "../gen/tessera/v1/verification_service_pb.js";
import { ensureDevCertificates } from "../src/certs/dev-ca.js";
import { compileForBench, type Launcher } from "./build.js";
import { JsonClient } from "./client.js";
import { grpcFrame } from "./fixtures.js";
import { GC_PROBE, type GcWindow, gcWindow, topAllocators } from "./gc-probe.js";
import { runH2load } from "./h2load.js";
import { benchServerEnv, procThreadCpuMs, type ServerProcess, startServerProcess } from "./processes.js";

const { values: flags } = parseArgs({
  options: {
    root: { type: "string" },
    limits: { type: "boolean", default: false },
    tool: { type: "string", default: "callgrind" },
    scenarios: { type: "string", default: "jwt,pat" },
    protocols: { type: "string", default: "connect,grpc" },
    warmup: { type: "string", default: "3000" },
    requests: { type: "string", default: "3000" },
    out: { type: "string" },
    build: { type: "string" },
    iterations: { type: "string" },
    env: { type: "string", multiple: true },
    transport: { type: "string" },
    "main-thread": { type: "boolean", default: false },
    keep: { type: "boolean", default: false },
    "heap-profile": { type: "boolean", default: false },
    "settle-gc": { type: "boolean", default: false },
    "node-arg": { type: "string", multiple: true },
    "server-log": { type: "string" },
  },
});
if (!flags.root) throw new Error("--root <checkout> is required");
const root = resolve(flags.root);
const tool = flags.tool as "callgrind" | "cpu-prof" | "strace" | "gc" | "none";
const mainThread = flags["main-thread"] === true;
// Why: a window of a few thousand calls holds a major collection (incremental marking and
// mark-compact, ~25,000 instructions a call over 3000 calls) or not depending on how close the
// old generation was to its limit when the window opened, which a checkout loading a little
// more code shifts; collected first, both sides of an A/B open their windows at the same phase.
const settleGc = flags["settle-gc"] === true && tool === "callgrind";
const scenarios = flags.scenarios.split(",");
const loginShed = scenarios.includes("login-shed");
const work = flags.out ? resolve(flags.out) : mkdtempSync(join(tmpdir(), "tessera-instructions-"));
mkdirSync(work, { recursive: true });
const log = (text: string) => process.stderr.write(`${text}\n`);

/** Issue 19's rivals (bench/run.ts's RIVALS): the script and the one protocol each speaks. */
const RIVALS = {
  "rival-fastify": { script: "bench/rival-fastify.ts", protocol: "connect" },
  "rival-grpc-js": { script: "bench/rival-grpc-js.ts", protocol: "grpc" },
} as const;
type RivalId = keyof typeof RIVALS;

const PATHS = {
  getCurrentUser: "tessera.v1.UserService/GetCurrentUser",
  login: "tessera.v1.UserService/Login",
  createUser: "tessera.v1.UserService/CreateUser",
  createPat: "tessera.v1.TokenService/CreatePersonalAccessToken",
  createMachineUser: "tessera.v1.MachineUserService/CreateMachineUser",
  checkAuthentication: "tessera.v1.MachineUserService/CheckAuthentication",
  createApiKey: "tessera.v1.TokenService/CreateApiKey",
  verifyCredential: "tessera.v1.VerificationService/VerifyCredential",
};

// A build folder given and already compiled is reused (two runs of one checkout compile once).
const buildDir = flags.build ? resolve(flags.build) : join(work, "build");
let launcher: Launcher;
if (existsSync(join(buildDir, "dist", "src", "main.js"))) launcher = compiledLauncher(buildDir);
else {
  log(`compiling ${root}…`);
  launcher = compileForBench(root, buildDir).launcher;
}
const certDir = join(work, "certs");
await ensureDevCertificates(certDir);
const tls = { ca: readFileSync(join(certDir, "ca.crt")) };
const dataDir = join(work, "data");
mkdirSync(dataDir, { recursive: true });
const adminPassword = randomBytes(18).toString("base64url");
const env = benchServerEnv(
  { dataDir, certDir, adminPassword },
  {
    TESSERA_JWT_SECRET: randomBytes(32).toString("base64url"),
    TESSERA_RATE_LIMIT: flags.limits ? "true" : "false",
    TESSERA_RATE_LIMIT_PER_IP: "1000000000",
    TESSERA_RATE_LIMIT_PER_PRINCIPAL: "1000000000",
    // server.transport; a checkout from before the key ignores it.
    ...(flags.transport ? { TESSERA_TRANSPORT: flags.transport } : {}),
    // login-shed: one hash at a time and none waiting, so that all but the Login holding the
    // slot are refused; no deadline (benchServerEnv's default here), or the seeding's own
    // logins, slow under callgrind, would be refused.
    ...(loginShed ? { TESSERA_HASH_CONCURRENCY: "1", TESSERA_HASH_QUEUE: "0" } : {}),
    ...(tool === "gc" && flags["heap-profile"] ? { GC_PROBE_HEAP_PROFILE: work } : {}),
    // Under callgrind each 600k-iteration PBKDF2 of the seeding (bootstrap, logins, the PAT)
    // costs minutes; a token's hash is checked once, so fewer iterations change no request.
    ...(flags.iterations ? { TESSERA_PASSWORD_ITERATIONS: flags.iterations } : {}),
    // A setting to compare (`--env TESSERA_LOG_ACCESS=off`): the same checkout with and without it.
    ...Object.fromEntries(
      (flags.env ?? []).map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
    ),
  },
);
/** The command line running `entry` with its arguments under the chosen tool (the server's, and a rival's). */
function underTool(script: string[]): [string, string[]] {
  const entry = [...(flags["node-arg"] ?? []), ...script];
  return tool === "callgrind"
    ? [
        "valgrind",
        [
          "--tool=callgrind",
          ...(mainThread ? ["--separate-threads=yes"] : []),
          `--callgrind-out-file=${join(work, "callgrind.%p")}`,
          launcher.command,
          ...(settleGc ? ["--expose-gc", "--import", gcProbeUrl()] : []),
          ...entry,
        ],
      ]
    : tool === "cpu-prof"
      ? [launcher.command, ["--cpu-prof", `--cpu-prof-dir=${join(work, "cpu-prof")}`, ...entry]]
      : tool === "gc"
        ? [launcher.command, ["--trace-gc-nvp", "--expose-gc", "--import", gcProbeUrl(), ...entry]]
        : [launcher.command, entry];
}
/** The server's output lines (with --tool gc: the collections and the probe's marks). */
const lines: string[] = [];
let marks = 0;
/** With --tool gc: collect garbage and mark the server's output, then wait for the mark. */
async function gcMark(pid: number, waitMs = 30_000): Promise<void> {
  marks++;
  process.kill(pid, "SIGUSR2");
  const deadline = Date.now() + waitMs;
  while (!lines.includes(`gc-probe: mark ${marks}`)) {
    if (Date.now() > deadline) throw new Error(`the server printed no mark ${marks}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
function gcProbeUrl(): string {
  const file = join(work, "gc-probe.mjs");
  writeFileSync(file, GC_PROBE);
  return pathToFileURL(file).href;
}
/** With --server-log: every output line of the server (and of a rival) appended to that file. */
const serverLog = flags["server-log"]
  ? createWriteStream(resolve(flags["server-log"]), { flags: "a" })
  : null;
const logLine = serverLog ? (line: string) => serverLog.write(`${line}\n`) : undefined;
// Only rivals measured: Tessera serves the seeding alone, so it runs without the tool.
const onlyRivals = scenarios.every((s) => s in RIVALS);
const [command, args] = onlyRivals
  ? [launcher.command, [...launcher.args("src/main.ts"), "serve"]]
  : underTool([...launcher.args("src/main.ts"), "serve"]);
log("starting the server…");
const server = await startServerProcess({
  name: "tessera",
  command,
  args,
  cwd: launcher.cwd,
  env,
  timeoutMs: 15 * 60_000,
  ...(tool === "gc" || settleGc
    ? {
        onLine: (line: string) => {
          lines.push(line);
          logLine?.(line);
        },
      }
    : logLine
      ? { onLine: logLine }
      : {}),
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

const api = new JsonClient(server.url, tls);
const user = { username: "bench-user", password: randomBytes(18).toString("base64url") };
const admin = await api.call<{ accessToken: string }>(PATHS.login, {
  username: "admin",
  password: adminPassword,
});
await api.call(
  PATHS.createUser,
  { ...user, scopes: ["bench:read"] },
  { authorization: `Bearer ${admin.accessToken}` },
);
const jwt = (await api.call<{ accessToken: string }>(PATHS.login, user)).accessToken;
const pat = (
  await api.call<{ token: string }>(PATHS.createPat, { name: "bench" }, { authorization: `Bearer ${jwt}` })
).token;
// verify-pat: a machine user holding auth:verify verifies the PAT (VerifyCredential).
const verifier = flags.scenarios.split(",").includes("verify-pat")
  ? (
      await api.call<{ token: string }>(
        PATHS.createMachineUser,
        { name: "bench-verifier", authType: "MACHINE_AUTH_TYPE_BEARER", scopes: ["auth:verify"] },
        { authorization: `Bearer ${admin.accessToken}` },
      )
    ).token
  : "";
const wantScenario = (name: string) => scenarios.includes(name);
const apiKey = wantScenario("api-key")
  ? (
      await api.call<{ key: string }>(
        PATHS.createApiKey,
        { name: "bench" },
        { authorization: `Bearer ${jwt}` },
      )
    ).key
  : "";
const muBearer = wantScenario("mu-bearer")
  ? (
      await api.call<{ token: string }>(
        PATHS.createMachineUser,
        { name: "bench-bearer", authType: "MACHINE_AUTH_TYPE_BEARER" },
        { authorization: `Bearer ${admin.accessToken}` },
      )
    ).token
  : "";
const muBasic = wantScenario("mu-basic")
  ? await api.call<{ username: string; password: string }>(
      PATHS.createMachineUser,
      { name: "bench-basic", authType: "MACHINE_AUTH_TYPE_BASIC" },
      { authorization: `Bearer ${admin.accessToken}` },
    )
  : undefined;
// The rivals answer with the user's creation time as Tessera's Connect JSON spells it.
const rivalIds = scenarios.filter((s): s is RivalId => s in RIVALS);
const createdAt =
  rivalIds.length > 0
    ? (await api.call<{ createdAt: string }>(PATHS.getCurrentUser, {}, { authorization: `Bearer ${jwt}` }))
        .createdAt
    : "";
await api.close();
/** The credential header each GetCurrentUser/CheckAuthentication scenario presents. */
const credentialHeaders = (scenario: string): Record<string, string> =>
  scenario === "api-key"
    ? { "x-api-key": apiKey }
    : scenario === "mu-bearer"
      ? { authorization: `Bearer ${muBearer}` }
      : scenario === "mu-basic"
        ? {
            authorization: `Basic ${Buffer.from(`${muBasic!.username}:${muBasic!.password}`).toString("base64")}`,
          }
        : { authorization: `Bearer ${tokens[scenario]}` };
/** Machine scenarios call CheckAuthentication (a machine user has no GetCurrentUser). */
const machineScenario = (scenario: string) => scenario === "mu-bearer" || scenario === "mu-basic";
// "refused": a forged access token (a JWT whose signature is not ours), replayed: the
// refusal an attacker drives, answered before the body is read (an error on every call).
const forged = `${jwt.slice(0, jwt.lastIndexOf(".") + 1)}${"A".repeat(43)}`;
const tokens: Record<string, string> = { jwt, pat, refused: forged, "verify-pat": verifier };
/** The login-shed scenario's request: a wrong password (the admin's username, so no dummy hash is made). */
const wrongLogin = { username: "admin", password: "not the admin's password" };

const bodies = {
  connect: { file: join(work, "body.json"), headers: { "content-type": "application/json" } },
  grpc: {
    file: join(work, "body.grpc"),
    headers: { "content-type": "application/grpc", te: "trailers" },
  },
};
writeFileSync(bodies.connect.file, "{}");
writeFileSync(bodies.grpc.file, grpcFrame(new Uint8Array()));
const loginBodies = {
  connect: join(work, "login.json"),
  grpc: join(work, "login.grpc"),
};
writeFileSync(loginBodies.connect, JSON.stringify(wrongLogin));
writeFileSync(
  loginBodies.grpc,
  grpcFrame(toBinary(LoginRequestSchema, create(LoginRequestSchema, wrongLogin))),
);
/** VerifyCredential's request for the PAT: {credential: pat}, as JSON and as a gRPC frame. */
const verifyBodies = {
  connect: join(work, "verify.json"),
  grpc: join(work, "verify.grpc"),
};
writeFileSync(verifyBodies.connect, JSON.stringify({ credential: pat }));
writeFileSync(
  verifyBodies.grpc,
  grpcFrame(
    toBinary(VerifyCredentialRequestSchema, create(VerifyCredentialRequestSchema, { credential: pat })),
  ),
);

/** The newest callgrind dump's total instruction count, and its file, of the process `pid` (the server, or a rival). */
function dumpTotal(pid = server.pid): { total: number; file: string } {
  execFileSync("callgrind_control", ["-d", String(pid)], { stdio: "ignore" });
  // Named callgrind.<pid>.<dump>, or callgrind.<pid>.<dump>-<thread> with --separate-threads
  // (thread 01: the main thread, Node's event loop).
  const dumpOf = (f: string) => Number(f.split(".").pop()!.split("-")[0]);
  const dumps = readdirSync(work)
    .filter((f) => f.startsWith(`callgrind.${pid}.`) && (!mainThread || f.endsWith("-01")))
    .sort((a, b) => dumpOf(a) - dumpOf(b));
  const file = join(work, dumps.at(-1)!);
  const m = /^(?:totals|summary):\s+(\d+)/m.exec(readFileSync(file, "utf8"));
  if (!m) throw new Error("no totals in the callgrind dump");
  return { total: Number(m[1]), file };
}

const warmup = Number(flags.warmup);
const requests = Number(flags.requests);
try {
  for (const scenario of scenarios) {
    for (const protocol of flags.protocols.split(",") as Array<keyof typeof bodies>) {
      const rivalId = scenario in RIVALS ? (scenario as RivalId) : undefined;
      // A rival speaks one protocol; it answers the JWT call as Tessera does (bench/rivals.ts).
      if (rivalId !== undefined && RIVALS[rivalId].protocol !== protocol) continue;
      const target = rivalId === undefined ? server : await startRival(rivalId);
      const verifying = scenario === "verify-pat";
      const shape =
        scenario === "login-shed"
          ? {
              url: `${server.url}/${PATHS.login}`,
              bodyFile: loginBodies[protocol],
              workDir: work,
              connections: 2,
              streams: 10,
              headers: bodies[protocol].headers,
              // Refused with Unavailable: 503 over Connect, 200 with grpc-status 14 over gRPC.
              expectStatus: protocol === "connect" ? 503 : 200,
            }
          : {
              url: `${target.url}/${verifying ? PATHS.verifyCredential : machineScenario(scenario) ? PATHS.checkAuthentication : PATHS.getCurrentUser}`,
              bodyFile: verifying ? verifyBodies[protocol] : bodies[protocol].file,
              workDir: work,
              connections: 2,
              streams: 10,
              headers: {
                ...bodies[protocol].headers,
                ...(rivalId === undefined ? credentialHeaders(scenario) : { authorization: `Bearer ${jwt}` }),
              },
              // A refusal is 401 over Connect; over gRPC the status is in the trailers (HTTP 200).
              expectStatus: scenario === "refused" && protocol === "connect" ? 401 : 200,
            };
      let load: Awaited<ReturnType<typeof runH2load>>;
      let cpuMs: number;
      let mainMs: number;
      let dump: { total: number; file: string } | null;
      let syscalls: SyscallCounts | null = null;
      let gc: GcWindow | null = null;
      try {
        await runH2load({ ...shape, requests: warmup });
        if (tool === "callgrind") {
          // The probe is in Tessera's process only; a full collection is slow under callgrind.
          if (settleGc && target === server) await gcMark(target.pid, 10 * 60_000);
          execFileSync("callgrind_control", ["-z", String(target.pid)], { stdio: "ignore" });
        }
        const tracer = tool === "strace" ? await attachStrace(target.pid, `${scenario}-${protocol}`) : null;
        if (tool === "gc") await gcMark(target.pid);
        const cpuBefore = target.cpuMs();
        const mainBefore = procThreadCpuMs(target.pid, target.pid);
        load = await runH2load({ ...shape, requests });
        cpuMs = target.cpuMs() - cpuBefore;
        mainMs = procThreadCpuMs(target.pid, target.pid) - mainBefore;
        dump = tool === "callgrind" ? dumpTotal(target.pid) : null;
        if (tracer) syscalls = await tracer.detach(requests);
        if (tool === "gc") {
          await gcMark(target.pid);
          gc = gcWindow(lines, marks - 1);
          lines.length = 0;
        }
      } finally {
        if (target !== server) await target.stop();
      }
      process.stdout.write(
        `${JSON.stringify({
          root,
          limits: flags.limits,
          scenario,
          protocol,
          requests,
          errors: load.errors,
          instructionsPerRequest: dump === null ? null : Math.round(dump.total / requests),
          ...(flags.keep && dump !== null ? { dump: dump.file } : {}),
          ...(gc === null
            ? {}
            : {
                heapBytesPerRequest: Math.round(gc.allocated / requests),
                promotedBytesPerRequest: Math.round(gc.promoted / requests),
                scavenges: gc.scavenges,
                promotedBytesPerScavenge: gc.scavenges ? Math.round(gc.promoted / gc.scavenges) : null,
                ...(flags["heap-profile"]
                  ? { topAllocators: topAllocators(join(work, `mark-${marks}.heapprofile`)) }
                  : {}),
              }),
          cpuUsPerRequest: Math.round((cpuMs * 1000) / requests),
          // The event loop's thread alone (the rest: V8's compiler and GC helpers, libuv's pool).
          mainThreadUsPerRequest: Math.round((mainMs * 1000) / requests),
          ...(syscalls ? { syscallsPerRequest: syscalls } : {}),
        })}\n`,
      );
    }
  }
} finally {
  await server.stop();
  serverLog?.end();
  if (tool === "callgrind" && !flags.keep) spawnSync("sh", ["-c", `rm -f ${join(work, "callgrind.*")}`]);
}

/**
 * Start issue 19's rival `id` from the compiled bench (as bench/run.ts starts it), under the
 * same tool as the server, with Tessera's JWT secret and the bench user's creation time.
 */
async function startRival(id: RivalId): Promise<ServerProcess> {
  const [command, args] = underTool([...launcher.args(RIVALS[id].script), certDir, join(root, "proto")]);
  log(`starting ${id}…`);
  return startServerProcess({
    name: id,
    command,
    args,
    cwd: launcher.cwd,
    timeoutMs: 15 * 60_000,
    ...(logLine ? { onLine: logLine } : {}),
    // The secret through the environment, not the command line (which `ps` shows).
    env: {
      ...process.env,
      BENCH_PORT: "0",
      RIVAL_JWT_SECRET: env.TESSERA_JWT_SECRET,
      RIVAL_CREATED_AT: createdAt,
    },
    ready: (line) => {
      const m = /^\{"listening":(\d+)\}$/.exec(line.trim());
      return m ? `https://127.0.0.1:${m[1]}` : null;
    },
  });
}

/** The launcher of a checkout compiled before into `buildDir` (see compileForBench). */
function compiledLauncher(buildDir: string): Launcher {
  const dist = join(buildDir, "dist");
  return {
    runtime: "compiled",
    command: process.execPath,
    args: (entry) => [join(dist, entry.replace(/\.ts$/, ".js"))],
    cwd: buildDir,
  };
}

/** System calls per request: the total and each call's count, most frequent first. */
type SyscallCounts = {
  total: number;
  calls: Record<string, number>;
  /** perf stat's software counters per request: context switches, migrations, page faults. */
  events: Record<string, number>;
};

/**
 * Count the system calls of every thread of `pid` with `perf trace -s` (kernel tracepoints:
 * unlike strace, it does not stop the server at each call, so the load and the batching it
 * causes stay as they are); `detach` stops it and divides its summary by the requests served.
 */
async function attachStrace(
  pid: number,
  name: string,
): Promise<{ detach(requests: number): Promise<SyscallCounts> }> {
  const out = join(work, `syscalls-${name}.txt`);
  const statOut = join(work, `perf-stat-${name}.txt`);
  const child = spawn("perf", ["trace", "-s", "-p", String(pid), "-o", out], { stdio: "ignore" });
  const stat = spawn(
    "perf",
    ["stat", "-x,", "-e", "context-switches,cpu-migrations,page-faults", "-p", String(pid), "-o", statOut],
    { stdio: "ignore" },
  );
  const exited = Promise.all([child, stat].map((c) => new Promise((resolve) => c.once("exit", resolve))));
  // perf says nothing once attached; a second is ample on an idle server.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  return {
    async detach(requests) {
      child.kill("SIGINT");
      stat.kill("SIGINT");
      await exited;
      const counts = new Map<string, number>();
      for (const line of readFileSync(out, "utf8").split("\n")) {
        // Per thread: syscall, calls, errors, total ms, min, avg, max, stddev.
        const m = /^\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s+[\d.]+\s/.exec(line);
        if (m) counts.set(m[1]!, (counts.get(m[1]!) ?? 0) + Number(m[2]));
      }
      const perRequest = (n: number) => Math.round((n / requests) * 1000) / 1000;
      const sorted = [...counts].sort((a, b) => b[1] - a[1]);
      const events: Record<string, number> = {};
      // CSV: value,unit,event,…
      for (const line of readFileSync(statOut, "utf8").split("\n")) {
        const [value, , event] = line.split(",");
        if (event && /^\d+$/.test(value ?? "")) events[event] = perRequest(Number(value));
      }
      return {
        events,
        total: perRequest(sorted.reduce((sum, [, n]) => sum + n, 0)),
        calls: Object.fromEntries(sorted.map(([call, n]) => [call, perRequest(n)])),
      };
    },
  };
}
