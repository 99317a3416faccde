import type http2 from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";

/**
 * Requests answered without their body (a made-up path, an OAuth request refused by the
 * per-IP budget) must not keep their HTTP/2 stream: left open until
 * server.requestTimeoutSeconds, every one held a stream slot and its memory, with no budget
 * spent, so one address with many connections held maxConcurrentStreams on each.
 */
const STREAMS = 100;
/** rateLimit.perIpPerMinute */
const BUDGET = 10;

/** Open `STREAMS` streams with `headers` whose body never ends; resolve with what became of them after `waitMs`. */
async function holdOpen(
  ts: TestServer,
  headers: http2.OutgoingHttpHeaders,
  waitMs: number,
): Promise<{ answered: number[]; open: number; serverOpen: number }> {
  const session = ts.session();
  session.on("error", () => undefined);
  await new Promise((resolve) => session.once("connect", resolve));
  const streams: http2.ClientHttp2Stream[] = [];
  const answered: number[] = [];
  for (let i = 0; i < STREAMS; i++) {
    const stream = session.request({ ...headers }, { endStream: false });
    stream.on("error", () => undefined);
    stream.on("response", (h) => answered.push(Number(h[":status"])));
    stream.resume();
    streams.push(stream);
  }
  await new Promise((resolve) => setTimeout(resolve, waitMs));
  const open = streams.filter((s) => !s.closed && !s.destroyed).length;
  const serverOpen = openOnServer;
  session.destroy();
  return { answered, open, serverOpen };
}

let openOnServer = 0;

describe.each(DATABASES)("streams answered before their body ($name)", (db) => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { enabled: true, perIpPerMinute: BUDGET },
      // Far past the test: only an answer that ends the stream frees it in time.
      server: { requestTimeoutSeconds: 120, idleTimeoutSeconds: 120 },
    });
    ts.server.server.on("stream", (stream: http2.ServerHttp2Stream) => {
      openOnServer++;
      stream.on("close", () => openOnServer--);
    });
  });
  afterAll(async () => ts?.close());

  // [what, request, status of the refused ones, streams rightly still open (those within the
  // per-IP budget wait for their form)]
  const cases: [string, http2.OutgoingHttpHeaders, number, number][] = [
    [
      "a POST to a path no RPC serves",
      { ":method": "POST", ":path": "/nope.v1.Nope/Nope", "content-type": "application/json" },
      404,
      0,
    ],
    ["a GET of a path nothing serves", { ":method": "GET", ":path": "/nothing-here" }, 404, 0],
    [
      "an OAuth token request past the per-IP budget",
      { ":method": "POST", ":path": "/oauth2/token", "content-type": "application/x-www-form-urlencoded" },
      429,
      BUDGET,
    ],
  ];
  it.each(cases)(
    "resets the stream of %s once answered, so none is held",
    async (_name, headers, status, waiting) => {
      const { answered, open, serverOpen } = await holdOpen(ts, headers, 1500);
      expect(answered.filter((s) => s === status).length).toBe(STREAMS - waiting);
      expect(open).toBe(waiting);
      expect(serverOpen).toBe(waiting);
    },
  );
});

/** server.maxStreamsPerIp in the server below. */
const MAX_STREAMS = 5;
const ORIGIN = "https://app.example";

/**
 * The same for the other answers given before the request's body: a streaming call refused
 * past server.maxStreamsPerIp (the refusal must free what that limit protects), a CORS
 * preflight and a plain endpoint sent with a body. Its own server, without the per-IP
 * budget, so the streams within the limit are the only ones rightly left open.
 */
describe.each(DATABASES)("streaming calls and plain answers given before their body ($name)", (db) => {
  let ts: TestServer;
  let open = 0;
  beforeAll(async () => {
    ts = await startTestServer(db, {
      cors: { allowedOrigins: [ORIGIN] },
      server: { maxStreamsPerIp: MAX_STREAMS, requestTimeoutSeconds: 120, idleTimeoutSeconds: 120 },
    });
    ts.server.server.on("stream", (stream: http2.ServerHttp2Stream) => {
      open++;
      stream.on("close", () => open--);
    });
  });
  afterAll(async () => ts?.close());

  /** Open `STREAMS` streams with `headers`, their body never ended; what became of them after `waitMs`. */
  async function hold(headers: http2.OutgoingHttpHeaders, waitMs: number) {
    // The streams of the case before are closed first (their session was destroyed).
    for (let i = 0; i < 100 && (open > 0 || ts.server.openStreamsFrom("127.0.0.1") > 0); i++)
      await new Promise((resolve) => setTimeout(resolve, 20));
    const session = ts.session();
    session.on("error", () => undefined);
    await new Promise((resolve) => session.once("connect", resolve));
    const streams: http2.ClientHttp2Stream[] = [];
    const answers: http2.IncomingHttpHeaders[] = [];
    for (let i = 0; i < STREAMS; i++) {
      const stream = session.request({ ...headers }, { endStream: false });
      stream.on("error", () => undefined);
      stream.on("response", (h) => answers.push(h));
      stream.resume();
      streams.push(stream);
    }
    await new Promise((resolve) => setTimeout(resolve, waitMs));
    const result = {
      answers,
      open: streams.filter((s) => !s.closed && !s.destroyed).length,
      serverOpen: open,
      openFromIp: ts.server.openStreamsFrom("127.0.0.1"),
    };
    session.destroy();
    return result;
  }

  const watch = (type: string) => ({
    ":method": "POST",
    ":path": "/grpc.health.v1.Health/Watch",
    "content-type": type,
    te: "trailers",
  });
  it.each([
    ["gRPC", watch("application/grpc")],
    ["gRPC-Web", watch("application/grpc-web+proto")],
    ["Connect", watch("application/connect+json")],
  ])(
    "resets the %s streaming calls refused past server.maxStreamsPerIp once answered",
    async (_name, headers) => {
      const { answers, open, serverOpen, openFromIp } = await hold(headers, 1500);
      // gRPC's refusals are trailers-only (grpc-status in the headers); the others' status is in their body.
      if (headers["content-type"] === "application/grpc")
        expect(answers.filter((h) => h["grpc-status"] === "8").length).toBe(STREAMS - MAX_STREAMS);
      else expect(answers.length).toBeGreaterThanOrEqual(STREAMS - MAX_STREAMS);
      // Only the calls within the limit, waiting for their request, are still open.
      expect(open).toBe(MAX_STREAMS);
      expect(serverOpen).toBe(MAX_STREAMS);
      expect(openFromIp).toBe(MAX_STREAMS);
    },
  );

  it.each([
    [
      "a CORS preflight",
      { ":method": "OPTIONS", ":path": "/tessera.v1.UserService/Login", origin: ORIGIN },
      204,
    ],
    ["a GET of /health", { ":method": "GET", ":path": "/health" }, 200],
    ["a HEAD of /health", { ":method": "HEAD", ":path": "/health" }, 200],
    ["a GET of the JWKS", { ":method": "GET", ":path": "/.well-known/jwks.json" }, 200],
  ])("resets the stream of %s sent with a body once answered", async (_name, headers, status) => {
    const { answers, open, serverOpen } = await hold(headers, 1500);
    expect(answers.filter((h) => Number(h[":status"]) === status).length).toBe(STREAMS);
    expect(open).toBe(0);
    expect(serverOpen).toBe(0);
  });
});
