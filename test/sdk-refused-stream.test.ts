import { readFileSync } from "node:fs";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import v8 from "node:v8";
import vm from "node:vm";
import {
  Code,
  ConnectError,
  createClient,
  createRouterTransport,
  type Interceptor,
} from "@connectrpc/connect";
import {
  connectNodeAdapter,
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import {
  GuardedSessionManager,
  refusedStream,
  retryRefusedStream,
  UnprocessedStreamError,
} from "../src/sdk/refused-stream.js";
import { createTestCerts, SQLITE, startTestServer, type TestServer } from "./helpers.js";

/** What connect-node throws for a stream the server refused (RST_STREAM or past a GOAWAY's last stream). */
function refused(): ConnectError {
  const cause = Object.assign(new Error("Stream closed with error code NGHTTP2_REFUSED_STREAM"), {
    code: "ERR_HTTP2_STREAM_ERROR",
  });
  return new ConnectError(cause.message, Code.Internal, undefined, undefined, cause);
}

/**
 * What connect-node 2.1.2 throws when the stream closed with REFUSED_STREAM and no "error"
 * event came first (its "close" listener: connectErrorFromH2ResetCode).
 */
function refusedOnClose(): ConnectError {
  return new ConnectError("http/2 stream closed with error code REFUSED_STREAM (0x7)", Code.Unavailable);
}

/** A Health client whose first `failures` calls fail on the way out with `error()`, as the HTTP/2 layer would. */
function failingFirst(failures: number, error: () => Error) {
  let calls = 0;
  const transport = createRouterTransport(
    ({ service }) => service(Health, { check: () => ({ status: 1 }) }),
    {
      transport: {
        interceptors: [
          retryRefusedStream,
          (next) => async (req) => {
            calls++;
            if (calls <= failures) throw error();
            return next(req);
          },
        ],
      },
    },
  );
  return { client: createClient(Health, transport), calls: () => calls };
}

describe("the SDK's retry of a refused HTTP/2 stream", () => {
  it("sends a unary call again once when its stream was refused", async () => {
    const { client, calls } = failingFirst(1, refused);
    expect((await client.check({})).status).toBe(1);
    expect(calls()).toBe(2);
  });

  it("retries only once (RFC 9113 8.7)", async () => {
    const { client, calls } = failingFirst(2, refused);
    await expect(client.check({})).rejects.toThrow(/REFUSED_STREAM/);
    expect(calls()).toBe(2);
  });

  it("sends a unary call again once when connect-node reports the refusal from the stream's close", async () => {
    const { client, calls } = failingFirst(1, refusedOnClose);
    expect((await client.check({})).status).toBe(1);
    expect(calls()).toBe(2);
  });

  it("does not retry any other failure", async () => {
    const { client, calls } = failingFirst(1, () => new ConnectError("down", Code.Unavailable));
    await expect(client.check({})).rejects.toThrow(/down/);
    expect(calls()).toBe(1);
  });

  it("recognises no failure of a call that may have run", () => {
    const sessionError = Object.assign(new Error("Session closed with error code 2"), {
      code: "ERR_HTTP2_SESSION_ERROR",
    });
    const closedWith = (name: string, code: Code) =>
      new ConnectError(`http/2 stream closed with error code ${name}`, code);
    // A server's own error in the same words: it carries its answer's headers.
    const fromServer = new ConnectError(refusedOnClose().rawMessage, Code.Unavailable, {
      "content-type": "application/json",
    });
    expect([
      refusedStream(refused()),
      refusedStream(refusedOnClose()),
      // A GOAWAY with an error code fails every stream of its session alike, run or not.
      refusedStream(
        new ConnectError(sessionError.message, Code.Internal, undefined, undefined, sessionError),
      ),
      refusedStream(closedWith("CANCEL (0x8)", Code.Canceled)),
      refusedStream(closedWith("INTERNAL_ERROR (0x2)", Code.Internal)),
      refusedStream(fromServer),
      refusedStream(new ConnectError(refusedOnClose().rawMessage, Code.Internal)),
      refusedStream(new ConnectError("down", Code.Unavailable)),
      // Past the last stream of a GOAWAY with an error code (GuardedSessionManager).
      refusedStream(
        new ConnectError("x", Code.Internal, undefined, undefined, new UnprocessedStreamError(5, 2, 3)),
      ),
    ]).toEqual([true, true, false, false, false, false, false, false, true]);
  });
});

/**
 * Over TLS, the real server refusing a stream: past `server.maxOpenStreamsPerIp` it resets it
 * with REFUSED_STREAM before any of its call runs. Every form connect-node gives it is retried.
 */
describe("the SDK's retry of a stream the server refused, over TLS", () => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, {
      server: { maxOpenStreamsPerIp: 1, requestTimeoutSeconds: 120, idleTimeoutSeconds: 120 },
    });
  });
  afterAll(async () => ts?.close());

  /** Hold the address's one stream (a unary call whose body never comes). */
  async function holdTheStream(): Promise<() => Promise<void>> {
    const session = http2.connect(ts.server.url, { ca: ts.certs.ca });
    session.on("error", () => undefined);
    const stream = session.request(
      {
        ":method": "POST",
        ":path": "/grpc.health.v1.Health/Check",
        "content-type": "application/grpc",
        te: "trailers",
      },
      { endStream: false },
    );
    stream.on("error", () => undefined);
    stream.resume();
    await expect.poll(() => ts.server.openStreamsFrom("127.0.0.1"), { timeout: 10_000 }).toBe(1);
    return async () => {
      session.destroy();
      await expect.poll(() => ts.server.openStreamsFrom("127.0.0.1"), { timeout: 10_000 }).toBe(0);
    };
  }

  /** Under the retry: the failures seen, the stream released at the first. */
  function releasing(release: () => Promise<void>, seen: unknown[]): Interceptor {
    return (next) => async (req) => {
      try {
        return await next(req);
      } catch (err) {
        seen.push(err);
        if (seen.length === 1) await release();
        throw err;
      }
    };
  }

  /**
   * connect-node's session manager; with `closeOnly`, a refused stream's "error" event is not
   * emitted (as a runtime may close it with no error event), so connect-node reports the
   * refusal from the stream's "close" and its rstCode.
   */
  class Sessions extends Http2SessionManager {
    constructor(private readonly closeOnly: boolean) {
      super(ts.server.url, {}, { ca: ts.certs.ca });
    }
    override async request(...args: Parameters<Http2SessionManager["request"]>) {
      const stream = await super.request(...args);
      if (this.closeOnly) {
        const emit = stream.emit.bind(stream);
        stream.emit = ((event: string, ...rest: unknown[]) => {
          const err = rest[0] as { code?: string } | undefined;
          if (event === "error" && err?.code === "ERR_HTTP2_STREAM_ERROR") return false;
          return emit(event, ...rest);
        }) as typeof stream.emit;
      }
      return stream;
    }
  }

  for (const [form, closeOnly, expected] of [
    [
      "Internal, Node's stream error as its cause",
      false,
      { code: Code.Internal, cause: "ERR_HTTP2_STREAM_ERROR" },
    ],
    ["Unavailable, no cause (the stream's close)", true, { code: Code.Unavailable, cause: undefined }],
  ] as const)
    for (const protocol of ["connect", "grpc"] as const)
      it(`retries a unary call refused with REFUSED_STREAM, reported as ${form} (${protocol})`, async () => {
        const release = await holdTheStream();
        const seen: unknown[] = [];
        const sessions = new Sessions(closeOnly);
        const options = {
          baseUrl: ts.server.url,
          sessionManager: sessions,
          interceptors: [retryRefusedStream, releasing(release, seen)],
        };
        const transport =
          protocol === "connect"
            ? createConnectTransport({ ...options, httpVersion: "2" })
            : createGrpcTransport(options);
        try {
          const res = await createClient(Health, transport).check({});
          expect(res.status).toBe(1);
          expect(
            seen.map((e) => ({
              code: (e as ConnectError).code,
              cause: ((e as ConnectError).cause as { code?: string })?.code,
            })),
          ).toEqual([expected]);
        } finally {
          sessions.abort();
          await release().catch(() => undefined);
        }
      });
});

/**
 * Over TLS, a server that sends GOAWAY while three unary calls are in flight on one session,
 * its last stream id the first of them: the two past it were never processed (RFC 9113 6.8)
 * and are sent again once, on a new session; the first may have run and is not. Node 20 fails
 * all three alike (ERR_HTTP2_SESSION_ERROR) when the GOAWAY carries an error code, and those
 * past the last stream with REFUSED_STREAM when it does not.
 */
describe("the SDK's retry of the calls a GOAWAY left unprocessed, over TLS", () => {
  let server: http2.Http2SecureServer;
  let url: string;
  let ca: Buffer;
  /** The GOAWAY the three calls after the first `warm` ones get, and whether it was sent. */
  let plan: { code: number; sent: boolean; warm: number } | undefined;
  /** The calls (by their x-call header) Health/Check ran for. */
  const ran: string[] = [];

  beforeAll(async () => {
    const certs = await createTestCerts();
    ca = certs.ca;
    server = http2.createSecureServer({
      key: readFileSync(join(certs.dir, "server.key")),
      cert: readFileSync(join(certs.dir, "server.crt")),
    });
    const adapter = connectNodeAdapter({
      routes: (router) =>
        router.service(Health, {
          check(_req, ctx) {
            ran.push(ctx.requestHeader.get("x-call") ?? "");
            return { status: HealthCheckResponse_ServingStatus.SERVING };
          },
          list: () => ({ statuses: {} }),
          async *watch() {},
        }),
    });
    const held: [http2.Http2ServerRequest, http2.Http2ServerResponse][] = [];
    server.on("request", (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
      if (plan === undefined || plan.sent) return adapter(req, res);
      if (plan.warm > 0) {
        plan.warm--;
        return adapter(req, res);
      }
      // Held, none of them served, until all three arrived on the session.
      req.stream.on("error", () => undefined);
      held.push([req, res]);
      if (held.length < 3) return;
      plan.sent = true;
      held.sort(([a], [b]) => a.stream.id! - b.stream.id!);
      const [[first, firstRes]] = held.splice(0);
      first.stream.session!.goaway(plan.code, first.stream.id!);
      // Without an error code the session lives on for the streams up to the last one.
      if (plan.code === http2.constants.NGHTTP2_NO_ERROR) adapter(first, firstRes!);
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `https://localhost:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await new Promise((resolve) => server?.close(resolve));
  });

  /** Three concurrent checks on one session of the SDK's transport: what each ended with. */
  async function threeCalls(protocol: "connect" | "grpc", warm = 0) {
    const sessions = new GuardedSessionManager(url, {}, { ca });
    const options = { baseUrl: url, sessionManager: sessions, interceptors: [retryRefusedStream] };
    const transport =
      protocol === "connect"
        ? createConnectTransport({ ...options, httpVersion: "2" })
        : createGrpcTransport(options);
    const client = createClient(Health, transport);
    try {
      // Calls made before, one after the other on the same session (its list of streams dropping closed ones).
      for (let i = 0; i < warm; i++) await client.check({}, { headers: { "x-call": "warm" } });
      const calls = ["a", "b", "c"].map((name) =>
        client.check({}, { headers: { "x-call": name } }).then(
          () => ({ name, ok: true }),
          (e: unknown) => ({
            name,
            ok: false,
            cause: (ConnectError.from(e).cause as { code?: string })?.code,
          }),
        ),
      );
      return await Promise.all(calls);
    } finally {
      sessions.abort();
    }
  }

  it("holds no stream once it closed, after a burst of concurrent calls", async () => {
    // The streams were held in a list pruned only at twice the most ever open: after a burst
    // of N calls, N closed streams (~11 KB each with connect-node's call state, their bearer
    // headers too) stayed alive for the session's life.
    v8.setFlagsFromString("--expose-gc");
    const gc = vm.runInNewContext("gc") as () => void;
    const made: WeakRef<http2.ClientHttp2Stream>[] = [];
    class Watched extends GuardedSessionManager {
      override async request(...args: Parameters<GuardedSessionManager["request"]>) {
        const stream = await super.request(...args);
        made.push(new WeakRef(stream));
        return stream;
      }
    }
    plan = undefined;
    const sessions = new Watched(url, {}, { ca });
    const client = createClient(
      Health,
      createConnectTransport({ baseUrl: url, httpVersion: "2", sessionManager: sessions }),
    );
    try {
      await Promise.all(Array.from({ length: 200 }, () => client.check({})));
      expect(made).toHaveLength(200);
      // The session is still open: only the streams' own end can have let them go.
      expect(sessions.state()).not.toBe("closed");
      await expect
        .poll(
          async () => {
            await new Promise((resolve) => setImmediate(resolve));
            gc();
            return made.filter((ref) => ref.deref() !== undefined).length;
          },
          { timeout: 10_000 },
        )
        .toBe(0);
    } finally {
      sessions.abort();
    }
  });

  for (const protocol of ["connect", "grpc"] as const)
    for (const [name, code, warm] of [
      ["INTERNAL_ERROR", http2.constants.NGHTTP2_INTERNAL_ERROR, 0],
      ["ENHANCE_YOUR_CALM", http2.constants.NGHTTP2_ENHANCE_YOUR_CALM, 0],
      ["INTERNAL_ERROR after 50 calls", http2.constants.NGHTTP2_INTERNAL_ERROR, 50],
    ] as const)
      it(`sends again once the calls past the last stream of a GOAWAY ${name}, never the one up to it (${protocol})`, async () => {
        ran.length = 0;
        plan = { code, sent: false, warm };
        const outcomes = await threeCalls(protocol, warm);
        expect(plan.sent).toBe(true);
        const failed = outcomes.filter((o) => !o.ok);
        // The first stream may have run: failed with the session's error, not sent again.
        expect(failed).toEqual([{ name: expect.any(String), ok: false, cause: "ERR_HTTP2_SESSION_ERROR" }]);
        // The two others ran once each, on the next session; the first never ran here.
        expect(ran.filter((r) => r !== "warm").sort()).toEqual(
          outcomes
            .filter((o) => o.ok)
            .map((o) => o.name)
            .sort(),
        );
      });

  for (const protocol of ["connect", "grpc"] as const)
    it(`sends again once the calls past the last stream of a GOAWAY NO_ERROR (${protocol})`, async () => {
      ran.length = 0;
      plan = { code: http2.constants.NGHTTP2_NO_ERROR, sent: false, warm: 0 };
      const outcomes = await threeCalls(protocol);
      expect(plan.sent).toBe(true);
      expect(outcomes.every((o) => o.ok)).toBe(true);
      expect(ran.sort()).toEqual(["a", "b", "c"]);
    });
});
