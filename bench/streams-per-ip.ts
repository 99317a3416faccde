/**
 * How many HTTP/2 streams one address can hold open on a real Tessera server over TLS, and
 * what each costs the server (RSS): the server runs `tessera serve` in a child process with
 * the default limits (rate limits on), the client is a raw node:http2 client on loopback.
 *
 * Each kind of stream is one a client can leave open without the server ending it at once:
 * - `health-open`: GET /health whose request never ends (no END_STREAM): answered, then
 *   held until server.requestTimeoutSeconds cancels it;
 * - `login-stalled`: a gRPC UserService/Login whose body never comes: admitted (counted
 *   against rateLimit.perIpPerMinute), held until server.requestTimeoutSeconds;
 * - `zero-window`: GET /health with the client's stream window at 0: the answer cannot be
 *   sent, held until the idle checks cancel it (one to two server.idleTimeoutSeconds);
 * - `watch`: grpc.health.v1.Health/Watch, a server stream (server.maxStreamsPerIp).
 *
 * Run: `npx tsx bench/streams-per-ip.ts [--connections 64] [--streams 256] [--kinds a,b]
 * [--hold-ms 3000] [--env KEY=VALUE ...]`; prints one JSON line per kind.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { ensureDevCertificates } from "../src/certs/dev-ca.js";
import { tsxLauncher } from "./build.js";
import { benchServerEnv, startServerProcess } from "./processes.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const { values } = parseArgs({
  options: {
    connections: { type: "string", default: "64" },
    streams: { type: "string", default: "256" },
    kinds: { type: "string", default: "health-open,login-stalled,zero-window,watch" },
    "hold-ms": { type: "string", default: "3000" },
    env: { type: "string", multiple: true, default: [] },
  },
});
const CONNECTIONS = Number(values.connections);
const STREAMS = Number(values.streams);
const HOLD_MS = Number(values["hold-ms"]);

/** The headers (and client settings) of each kind of held stream. */
const KINDS: Record<string, { headers: http2.OutgoingHttpHeaders; endStream: boolean; window0?: boolean }> = {
  "health-open": { headers: { ":method": "GET", ":path": "/health" }, endStream: false },
  "login-stalled": {
    headers: {
      ":method": "POST",
      ":path": "/tessera.v1.UserService/Login",
      "content-type": "application/grpc",
      te: "trailers",
    },
    endStream: false,
  },
  "zero-window": { headers: { ":method": "GET", ":path": "/health" }, endStream: true, window0: true },
  watch: {
    headers: {
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Watch",
      "content-type": "application/grpc",
      te: "trailers",
    },
    endStream: false,
  },
};
/** An empty gRPC message (HealthCheckRequest{}), for Watch. */
const EMPTY_GRPC = Buffer.from([0, 0, 0, 0, 0]);

const work = mkdtempSync(join(tmpdir(), "tessera-streams-"));
const certDir = join(work, "certs");
await ensureDevCertificates(certDir);
const ca = readFileSync(join(certDir, "ca.crt"));

async function measure(kind: string): Promise<Record<string, unknown>> {
  const spec = KINDS[kind];
  if (spec === undefined) throw new Error(`unknown kind ${kind}`);
  const dataDir = join(work, `data-${kind}`);
  mkdirSync(dataDir);
  const extra: Record<string, string> = { TESSERA_RATE_LIMIT: "true" };
  for (const kv of values.env) {
    const i = kv.indexOf("=");
    extra[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const server = await startServerProcess({
    name: `tessera-${kind}`,
    ...tsxLauncher(ROOT),
    args: tsxLauncher(ROOT).args("src/main.ts").concat("serve"),
    env: benchServerEnv(
      { dataDir, certDir, adminPassword: "streams-bench-admin", hashDefaults: true },
      extra,
    ),
    ready: (line) => {
      try {
        const entry = JSON.parse(line) as { msg?: string; url?: string };
        return entry.msg === "tessera listening" && entry.url ? entry.url : null;
      } catch {
        return null;
      }
    },
  });
  const sessions: http2.ClientHttp2Session[] = [];
  const streams: http2.ClientHttp2Stream[] = [];
  let refused = 0;
  let answeredNon200 = 0;
  // Answered with a gRPC status in the headers (trailers-only, e.g. RESOURCE_EXHAUSTED past
  // server.maxStreamsPerIp), yet still open because the client never ended its side.
  let grpcAnswered = 0;
  try {
    for (let c = 0; c < CONNECTIONS; c++) {
      const session = http2.connect(server.url, {
        ca,
        settings: spec.window0 ? { initialWindowSize: 0 } : {},
      });
      session.on("error", () => undefined);
      await new Promise((r, j) => {
        session.once("remoteSettings", r);
        session.once("close", () => j(new Error(`connection ${c} closed before its settings`)));
      });
      sessions.push(session);
    }
    await new Promise((r) => setTimeout(r, 500));
    const rssConnected = server.rssKb();
    for (const session of sessions)
      for (let s = 0; s < STREAMS; s++) {
        const stream = session.request({ ...spec.headers }, { endStream: spec.endStream });
        stream.on("error", () => undefined);
        stream.on("close", () => {
          if (stream.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM) refused++;
        });
        stream.on("response", (h) => {
          if (h[":status"] !== 200) answeredNon200++;
          if (h["grpc-status"] !== undefined) grpcAnswered++;
        });
        if (kind === "watch") stream.write(EMPTY_GRPC);
        if (!spec.window0) stream.resume();
        streams.push(stream);
      }
    // Held streams are counted once the server has dealt with every one of them (its CPU
    // idle for a second), and HOLD_MS later: a count taken while it still works on
    // them counts requests not yet read as held.
    const started = Date.now();
    let cpu = server.cpuMs();
    // The most held at once while the server works through them (a deadline may end the
    // first before it reaches the last), sampled every 250 ms, with the RSS then.
    let peakOpen = 0;
    let peakRss = 0;
    const sampler = setInterval(() => {
      const n = streams.filter((s) => !s.closed && !s.destroyed).length;
      if (n >= peakOpen) peakOpen = n;
      peakRss = Math.max(peakRss, server.rssKb());
    }, 250);
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      const now = server.cpuMs();
      const busy = now - cpu;
      cpu = now;
      if (busy < 50 || Date.now() - started > 120_000) break;
    }
    const settledMs = Date.now() - started;
    clearInterval(sampler);
    await new Promise((r) => setTimeout(r, HOLD_MS));
    const open = streams.filter((s) => !s.closed && !s.destroyed).length;
    const rssHeld = server.rssKb();
    return {
      kind,
      connections: CONNECTIONS,
      opened: streams.length,
      settledMs,
      openAfterMs: settledMs + HOLD_MS,
      open,
      peakOpen,
      peakRssMiB: +(peakRss / 1024).toFixed(1),
      refused,
      answeredNon200,
      grpcAnswered,
      rssConnectedMiB: +(rssConnected / 1024).toFixed(1),
      rssHeldMiB: +(rssHeld / 1024).toFixed(1),
      kibPerOpenStream: open > 0 ? +((rssHeld - rssConnected) / open).toFixed(2) : null,
    };
  } finally {
    for (const s of sessions) s.destroy();
    await server.stop();
  }
}

try {
  for (const kind of values.kinds.split(",")) console.log(JSON.stringify(await measure(kind)));
} finally {
  rmSync(work, { recursive: true, force: true });
}
