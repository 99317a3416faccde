import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { refusalCounter } from "../../src/server/refusals.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";

/**
 * server.maxConcurrentStreams bounds streams per connection only: one address with
 * maxConnectionsPerIp connections held 1024 × 256 = 262,144 open streams (each a call held by
 * a body that never comes, a server stream, or an answer the client does not read), with
 * their buffers and timers (bench/results/2026-12-09-streams-per-ip.md). server.maxOpenStreamsPerIp
 * bounds them over all of an address's connections: past it a stream is reset with
 * REFUSED_STREAM before any of its call runs, and counted.
 */
const LIMIT = 4;
const LOOPBACK = "127.0.0.1";
/** Another loopback address: another peer, as far as the server can tell. */
const OTHER = "127.0.0.2";

/** A unary call whose body never comes: the server holds its stream until requestTimeoutSeconds. */
const STALLED: http2.OutgoingHttpHeaders = {
  ":method": "POST",
  ":path": "/tessera.v1.UserService/Login",
  "content-type": "application/grpc",
  te: "trailers",
};

/** An HTTP/2 connection from `localAddress`, with its TLS socket (the session's own cannot be destroyed). */
async function connect(
  ts: TestServer,
  localAddress = LOOPBACK,
): Promise<http2.ClientHttp2Session & { tls: tls.TLSSocket }> {
  const socket = tls.connect({
    socket: net.connect({ host: LOOPBACK, port: ts.server.port, localAddress }),
    ca: ts.certs.ca,
    servername: "localhost",
    ALPNProtocols: ["h2"],
  });
  const session = http2.connect(ts.server.url, { createConnection: () => socket });
  session.on("error", () => undefined);
  await new Promise((resolve) => session.once("remoteSettings", resolve));
  return Object.assign(session, { tls: socket });
}

function hold(session: http2.ClientHttp2Session): http2.ClientHttp2Stream {
  const stream = session.request({ ...STALLED }, { endStream: false });
  stream.on("error", () => undefined);
  stream.resume();
  return stream;
}

/**
 * The RST_STREAM code the stream closed with (0: closed without one), a turn of the event loop
 * after its close: node:http2's client (Node 20.20) spins for ever, growing its output buffer,
 * when its session is destroyed in the same turn as a stream the peer reset (any code).
 */
function closeCode(stream: http2.ClientHttp2Stream): Promise<number> {
  return new Promise((resolve) => {
    const settle = () => setImmediate(() => resolve(stream.rstCode ?? 0));
    if (stream.closed) settle();
    else stream.once("close", settle);
  });
}

async function until(what: string, ok: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** `tessera_streams_refused_total{limit="open_per_ip"}`, as scraped. */
async function refusedStreams(ts: TestServer): Promise<number> {
  const m = /^tessera_streams_refused_total\{limit="open_per_ip"\} (\d+)/m.exec(
    await ts.app.metrics!.scrape(),
  );
  return m ? Number(m[1]) : 0;
}

describe("server.maxOpenStreamsPerIp", () => {
  let ts: TestServer;
  const sessions: http2.ClientHttp2Session[] = [];
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, {
      // Far past the test: only the bound ends or refuses a stream in time.
      server: { maxOpenStreamsPerIp: LIMIT, requestTimeoutSeconds: 120, idleTimeoutSeconds: 120 },
    });
  });
  afterEach(async () => {
    // Not in the turn a stream was reset in (see closeCode).
    await new Promise((r) => setImmediate(r));
    for (const s of sessions.splice(0)) s.destroy();
    await until("the server counts no stream open", () => ts.server.openStreamsFrom(LOOPBACK) === 0);
  });
  afterAll(async () => ts?.close());

  it("refuses the stream past the limit, over all of an address's connections, with REFUSED_STREAM, and counts it", async () => {
    const a = await connect(ts);
    const b = await connect(ts);
    sessions.push(a, b);
    const held = [hold(a), hold(a), hold(b), hold(b)];
    await until(`${LIMIT} streams are open`, () => ts.server.openStreamsFrom(LOOPBACK) === LIMIT);
    const before = await refusedStreams(ts);
    const over = [hold(a), hold(b)];
    expect(await Promise.all(over.map(closeCode))).toEqual([
      http2.constants.NGHTTP2_REFUSED_STREAM,
      http2.constants.NGHTTP2_REFUSED_STREAM,
    ]);
    expect(await refusedStreams(ts)).toBe(before + 2);
    // The held ones are untouched, and the refused ones were never counted.
    expect(held.every((s) => !s.closed)).toBe(true);
    expect(ts.server.openStreamsFrom(LOOPBACK)).toBe(LIMIT);
  });

  it("admits a stream again once one of the address's streams closes", async () => {
    const a = await connect(ts);
    sessions.push(a);
    const held = Array.from({ length: LIMIT }, () => hold(a));
    await until(`${LIMIT} streams are open`, () => ts.server.openStreamsFrom(LOOPBACK) === LIMIT);
    expect(await closeCode(hold(a))).toBe(http2.constants.NGHTTP2_REFUSED_STREAM);
    held[0]!.close(http2.constants.NGHTTP2_CANCEL);
    await until("the closed stream is no longer counted", () => ts.server.openStreamsFrom(LOOPBACK) < LIMIT);
    const again = hold(a);
    await until("the new stream is counted", () => ts.server.openStreamsFrom(LOOPBACK) === LIMIT);
    expect(again.closed).toBe(false);
  });

  it("leaves other addresses' streams alone", async () => {
    const a = await connect(ts);
    const other = await connect(ts, OTHER);
    sessions.push(a, other);
    for (let i = 0; i < LIMIT; i++) hold(a);
    await until(`${LIMIT} streams are open`, () => ts.server.openStreamsFrom(LOOPBACK) === LIMIT);
    const theirs = Array.from({ length: LIMIT }, () => hold(other));
    await until(
      `the other address's ${LIMIT} streams are open`,
      () => ts.server.openStreamsFrom(OTHER) === LIMIT,
    );
    expect(theirs.every((s) => !s.closed)).toBe(true);
    expect(ts.server.openStreamsFrom(LOOPBACK)).toBe(LIMIT);
  });

  for (const how of ["closes its connection", "destroys its socket abruptly"] as const)
    it(`counts nothing left once a client holding streams ${how}`, async () => {
      const a = await connect(ts);
      for (let i = 0; i < LIMIT; i++) hold(a);
      await until(`${LIMIT} streams are open`, () => ts.server.openStreamsFrom(LOOPBACK) === LIMIT);
      if (how === "closes its connection") a.destroy();
      else a.tls.destroy();
      await until("the server counts no stream open", () => ts.server.openStreamsFrom(LOOPBACK) === 0);
      // And the address has its whole allowance again.
      const b = await connect(ts);
      sessions.push(b);
      const again = Array.from({ length: LIMIT }, () => hold(b));
      await until(`${LIMIT} streams are open again`, () => ts.server.openStreamsFrom(LOOPBACK) === LIMIT);
      expect(again.every((s) => !s.closed)).toBe(true);
    });
});

describe("the refusal warning", () => {
  it("reports the streams refused in the interval, in one line", async () => {
    const warn = vi.fn();
    const refuse = refusalCounter(new net.Server(), { logger: { warn }, clock: () => Date.now() }, 20);
    refuse("open_streams_per_ip");
    refuse("open_streams_per_ip");
    refuse("per_ip");
    await new Promise((r) => setTimeout(r, 60));
    expect(warn).toHaveBeenCalledTimes(1);
    expect(warn.mock.calls[0]![0]).toEqual({
      refused: { open_streams_per_ip: 2, per_ip: 1 },
      intervalMs: 20,
    });
  });
});
