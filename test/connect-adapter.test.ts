import http from "node:http";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { Writable } from "node:stream";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import {
  compressionGzip,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { ServerReflection } from "../gen/grpc/reflection/v1/reflection_pb.js";
import type { WireError } from "../src/transport/early-answers.js";
import { type ConnectHandlerOptions, createConnectHandler } from "../src/transport/fast-adapter.js";
import { serveRequests } from "../src/transport/stream-server.js";

/** An error with everything a protocol must carry: code, message, metadata and a detail. */
function refusal(): ConnectError {
  return new ConnectError(
    'refused: "quoted", non-ASCII é, 100%',
    Code.PermissionDenied,
    { "www-authenticate": 'Bearer realm="x"', "retry-after": "7" },
    [
      {
        desc: ErrorInfoSchema,
        value: { reason: "ACCESS_DENIED", domain: "tessera.dev", metadata: { request_id: "r-1" } },
      },
    ],
  );
}

/** What a client sees of an error, for comparison. */
async function seen(call: Promise<unknown>) {
  const err = await call.then(
    () => null,
    (e: unknown) => ConnectError.from(e),
  );
  expect(err).toBeInstanceOf(ConnectError);
  return {
    code: err!.code,
    message: err!.rawMessage,
    wwwAuthenticate: err!.metadata.get("www-authenticate"),
    retryAfter: err!.metadata.get("retry-after"),
    details: err!.findDetails(ErrorInfoSchema).map((d) => ({ ...d })),
  };
}

/**
 * src/transport/fast-adapter.ts replaces connect-node's adapter in front of the router: these
 * tests hold it to the same contract (every protocol, streaming in both directions,
 * compression, limits, cancellation reaching the handler, unknown paths).
 */

interface Probe {
  watchAborted: Promise<string>;
  /** A Check of service "wait" started, and why its signal aborted. */
  checkWaiting: Promise<void>;
  checkAborted: Promise<string>;
}

const abortReason = (signal: AbortSignal) =>
  ConnectError.from(signal.reason).code === Code.Canceled ? "canceled" : String(signal.reason);

type Admit = NonNullable<ConnectHandlerOptions["admit"]>;

/** "h2c": the adapter on the "request" event; "h2-direct": installed with serveRequests, as Tessera's server does. */
type Kind = "h2c" | "h2-direct" | "http1";

function startServer(
  kind: Kind,
  errorBody?: (body: Uint8Array) => Uint8Array,
  admit?: Admit,
  logger?: ConnectHandlerOptions["logger"],
) {
  let reportAbort!: (reason: string) => void;
  let reportWaiting!: () => void;
  let reportCheckAborted!: (reason: string) => void;
  const probe: Probe = {
    watchAborted: new Promise((resolve) => (reportAbort = resolve)),
    checkWaiting: new Promise((resolve) => (reportWaiting = resolve)),
    checkAborted: new Promise((resolve) => (reportCheckAborted = resolve)),
  };
  const handler = createConnectHandler({
    readMaxBytes: 1024,
    ...(errorBody ? { errorBody: (_req, body) => errorBody(body) } : {}),
    ...(admit ? { admit } : {}),
    ...(logger ? { logger } : {}),
    routes(router) {
      router.service(Health, {
        async check(req, ctx) {
          if (req.service === "wait") {
            reportWaiting();
            await new Promise<void>((resolve) =>
              ctx.signal.addEventListener("abort", () => resolve(), { once: true }),
            );
            reportCheckAborted(abortReason(ctx.signal));
          }
          if (req.service === "fail") throw new ConnectError("no such service", Code.NotFound);
          if (req.service === "refuse") throw refusal();
          return { status: HealthCheckResponse_ServingStatus.SERVING };
        },
        list() {
          return { statuses: {} };
        },
        async *watch(_req, ctx) {
          yield { status: HealthCheckResponse_ServingStatus.SERVING };
          await new Promise<void>((resolve) =>
            ctx.signal.addEventListener("abort", () => resolve(), { once: true }),
          );
          reportAbort(abortReason(ctx.signal));
        },
      });
      router.service(ServerReflection, {
        async *serverReflectionInfo(requests) {
          for await (const r of requests) yield { validHost: r.host, originalRequest: r };
        },
      });
    },
  });
  let server: http2.Http2Server | http.Server;
  if (kind === "h2-direct") {
    server = http2.createServer();
    serveRequests(server, handler);
  } else server = kind === "h2c" ? http2.createServer(handler) : http.createServer(handler);
  const sessions = new Set<http2.Http2Session>();
  server.on("session", (session: http2.Http2Session) => sessions.add(session));
  return new Promise<{ url: string; probe: Probe; close: () => Promise<void> }>((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo;
      resolve({
        url: `http://127.0.0.1:${port}`,
        probe,
        close: () =>
          new Promise<void>((done) => {
            if ("closeAllConnections" in server) server.closeAllConnections();
            for (const session of sessions) session.destroy();
            server.close(() => done());
          }),
      });
    });
  });
}

/** A Connect JSON POST to Health/Check on `session`, left open for the caller to write, and its status. */
function postCheck(session: http2.ClientHttp2Session) {
  const stream = session.request({
    ":method": "POST",
    ":path": "/grpc.health.v1.Health/Check",
    "content-type": "application/json",
  });
  const status = new Promise<number>((resolve) =>
    stream.once("response", (h) => resolve(Number(h[":status"]))),
  );
  return { stream, status };
}

/** `promise`, or a failure naming `what` did not happen within `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(what)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

let closers: (() => Promise<void>)[] = [];
afterEach(async () => {
  await Promise.all(closers.map((c) => c()));
  closers = [];
});

async function served(
  kind: Kind,
  errorBody?: (body: Uint8Array) => Uint8Array,
  admit?: Admit,
  logger?: ConnectHandlerOptions["logger"],
) {
  const s = await startServer(kind, errorBody, admit, logger);
  closers.push(s.close);
  return s;
}

describe("the Connect adapter", () => {
  const protocols: [string, Kind, (url: string) => Transport][] = [
    ["Connect JSON over HTTP/2", "h2c", (url) => createConnectTransport({ baseUrl: url, httpVersion: "2" })],
    [
      "Connect JSON over HTTP/2, from the stream",
      "h2-direct",
      (url) => createConnectTransport({ baseUrl: url, httpVersion: "2" }),
    ],
    ["gRPC, from the stream", "h2-direct", (url) => createGrpcTransport({ baseUrl: url })],
    [
      "Connect binary over HTTP/1.1",
      "http1",
      (url) => createConnectTransport({ baseUrl: url, httpVersion: "1.1", useBinaryFormat: true }),
    ],
    ["gRPC", "h2c", (url) => createGrpcTransport({ baseUrl: url })],
    [
      "gRPC-Web over HTTP/1.1",
      "http1",
      (url) => createGrpcWebTransport({ baseUrl: url, httpVersion: "1.1" }),
    ],
  ];

  for (const [name, kind, transport] of protocols) {
    it(`serves a unary call and its error over ${name}`, async () => {
      const { url } = await served(kind);
      const client = createClient(Health, transport(url));
      expect((await client.check({ service: "" })).status).toBe(HealthCheckResponse_ServingStatus.SERVING);
      const err = await client.check({ service: "fail" }).catch((e: unknown) => ConnectError.from(e));
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(Code.NotFound);
      expect((err as ConnectError).rawMessage).toBe("no such service");
    });
  }

  for (const [name, kind, transport] of protocols) {
    it(`answers an error from admit before Connect as Connect's handler does, over ${name}`, async () => {
      const early = await served(kind, undefined, () => Promise.resolve(refusal()));
      const late = await served(kind);
      // Service "" would be served: an error shows that no handler ran.
      const fromAdmit = await seen(createClient(Health, transport(early.url)).check({ service: "" }));
      const fromHandler = await seen(createClient(Health, transport(late.url)).check({ service: "refuse" }));
      expect(fromAdmit).toEqual(fromHandler);
      expect(fromAdmit.code).toBe(Code.PermissionDenied);
      expect(fromAdmit.details).toHaveLength(1);
    });
  }

  for (const [name, kind, transport] of protocols) {
    it(`answers a WireError from admit with the wire form it gives, errorBody untouched, over ${name}`, async () => {
      const wire: WireError = {
        code: Code.PermissionDenied,
        connect() {
          const body = Buffer.from('{"code":"permission_denied","message":"from the wire form"}');
          return {
            header: {
              "x-wire": "yes",
              "content-type": "application/json",
              "content-length": body.byteLength,
            },
            body,
          };
        },
        grpcTrailers: () => ({
          "x-wire": "yes",
          "grpc-status": String(Code.PermissionDenied),
          "grpc-message": "from%20the%20wire%20form",
        }),
      };
      // A rewrite that would show: the wire form's Connect body is final.
      const rewrite = () => Buffer.from('{"code":"internal","message":"rewritten"}');
      const { url } = await served(kind, rewrite, () => wire);
      const err = await createClient(Health, transport(url))
        .check({ service: "" })
        .then(
          () => null,
          (e: unknown) => ConnectError.from(e),
        );
      expect(err?.code).toBe(Code.PermissionDenied);
      expect(err?.rawMessage).toBe("from the wire form");
      expect(err?.metadata.get("x-wire")).toBe("yes");
    });
  }

  it("goes on into Connect when admit returns nothing, and never asks about a call it cannot answer early", async () => {
    const calls: string[] = [];
    const { url } = await served("h2c", undefined, (_req, method) => {
      calls.push(method.name);
      // A stream is never asked about: its admission is the pipeline's, run once there.
      return method.name === "Check" ? undefined : refusal();
    });
    const client = createClient(Health, createGrpcTransport({ baseUrl: url }));
    expect((await client.check({ service: "" })).status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    const first = await client.watch({ service: "" })[Symbol.asyncIterator]().next();
    expect(first.value?.status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    expect(calls).toEqual(["Check"]);
  });

  it("stops a client still sending the body of a call it refused early, once past readMaxBytes", async () => {
    const refuse: Admit = () => refusal();
    // HTTP/2: the answer, then RST_STREAM NO_ERROR; the connection stays usable.
    for (const kind of ["h2c", "h2-direct"] as const) {
      const h2 = await served(kind, undefined, refuse);
      const session = http2.connect(h2.url);
      try {
        const { stream, status } = postCheck(session);
        // "aborted": the server's RST_STREAM closed the stream while this side was still
        // writing (with a write in flight when it arrives, Node's client stream is closed but
        // never destroyed, so "close" may not come).
        const closed = new Promise<number>((resolve) => {
          const done = () => resolve(stream.rstCode ?? -1);
          stream.once("close", done);
          stream.once("aborted", done);
        });
        stream.on("error", () => undefined);
        stream.resume();
        // Never ended: 4 KiB every 5 ms, far past the 1 KiB readMaxBytes of this server.
        const timer = setInterval(() => {
          if (!stream.destroyed) stream.write(Buffer.alloc(4096, 0x20));
        }, 5);
        try {
          expect(await status).toBe(403);
          expect(await within(closed, 5000, `${kind}: the server kept reading the body`)).toBe(
            http2.constants.NGHTTP2_NO_ERROR,
          );
        } finally {
          clearInterval(timer);
          // A client stream left with a write in flight is never destroyed by Node itself.
          stream.destroy();
        }
        const { stream: again, status: againStatus } = postCheck(session);
        again.end("{}");
        again.resume();
        expect(await againStatus).toBe(403);
      } finally {
        session.close();
      }
    }

    // HTTP/1.1: the answer, then the connection is closed rather than read on.
    const h1 = await served("http1", undefined, refuse);
    const { port } = new URL(h1.url);
    const outcome = await new Promise<{ status: number; socketClosed: boolean }>((resolve, reject) => {
      const req = http.request({
        host: "127.0.0.1",
        port,
        method: "POST",
        path: "/grpc.health.v1.Health/Check",
        headers: { "content-type": "application/json", "transfer-encoding": "chunked" },
      });
      let status = 0;
      req.on("response", (res) => {
        status = res.statusCode ?? 0;
        res.resume();
      });
      req.on("error", () => undefined);
      const timer = setInterval(() => {
        if (!req.destroyed) req.write(Buffer.alloc(4096, 0x20));
      }, 5);
      req.on("socket", (socket) =>
        socket.once("close", () => {
          clearInterval(timer);
          resolve({ status, socketClosed: true });
        }),
      );
      setTimeout(() => {
        clearInterval(timer);
        reject(new Error("the server kept reading the body"));
      }, 5000).unref();
    });
    expect(outcome).toEqual({ status: 403, socketClosed: true });
  });

  it("served from the stream, tells the handler when the client resets a unary call", async () => {
    const { url, probe } = await served("h2-direct");
    const session = http2.connect(url);
    try {
      const { stream } = postCheck(session);
      stream.on("error", () => undefined);
      stream.end(JSON.stringify({ service: "wait" }));
      await within(probe.checkWaiting, 5000, "the call did not start");
      stream.close(http2.constants.NGHTTP2_CANCEL);
      expect(await within(probe.checkAborted, 5000, "the handler was not told")).toBe("canceled");
    } finally {
      session.close();
    }
  });

  it("served from the stream, reads an empty body that ended while admission was pending", async () => {
    // Admission long enough for the whole request to arrive before the body is read.
    const slowly: Admit = () => new Promise((resolve) => setTimeout(() => resolve(undefined), 50));
    const { url } = await served("h2-direct", undefined, slowly);
    const session = http2.connect(url);
    try {
      const stream = session.request({
        ":method": "POST",
        ":path": "/grpc.health.v1.Health/Check",
        "content-type": "application/proto",
      });
      const status = new Promise<number>((resolve) =>
        stream.once("response", (h) => resolve(Number(h[":status"]))),
      );
      const chunks: Buffer[] = [];
      stream.on("data", (c: Buffer) => chunks.push(c));
      const ended = new Promise((resolve) => stream.once("end", resolve));
      // An empty DATA frame with END_STREAM: Node reads the stream to its "end" at once.
      stream.end(new Uint8Array(0));
      await within(ended, 5000, "the call was never answered");
      expect(await status).toBe(200);
      expect(Buffer.concat(chunks)).toEqual(Buffer.from([0x08, 0x01]));
    } finally {
      session.close();
    }
  });

  it("answers Internal when admit throws or rejects", async () => {
    for (const admit of [
      () => {
        throw new Error("boom");
      },
      () => Promise.reject(new Error("boom")),
    ] as Admit[]) {
      for (const kind of ["h2c", "h2-direct"] as const) {
        const { url } = await served(kind, undefined, admit);
        const err = await seen(
          createClient(Health, createConnectTransport({ baseUrl: url, httpVersion: "2" })).check({}),
        );
        expect(err.code).toBe(Code.Internal);
        // What failed inside stays inside.
        expect(err.message).toBe("internal error");
      }
    }
  });

  it("logs a failure of admit through the logger, never on the console nor with the statement a driver error carries", async () => {
    const secret = "pbkdf2-sha256$600000$c2FsdA$aGFzaA";
    const driverError = () =>
      Object.assign(new Error(`insert into users (password_hash) values ('${secret}') - UNIQUE failed`), {
        name: "SqliteError",
        code: "SQLITE_CONSTRAINT_UNIQUE",
      });
    const lines: string[] = [];
    const logger = pino(
      { level: "trace" },
      new Writable({
        write(chunk, _encoding, done) {
          lines.push(String(chunk));
          done();
        },
      }),
    );
    const consoleError = vi.spyOn(console, "error").mockImplementation(() => undefined);
    try {
      for (const admit of [
        () => {
          throw driverError();
        },
        () => Promise.reject(driverError()),
      ] as Admit[]) {
        const { url } = await served("h2-direct", undefined, admit, logger);
        const err = await seen(
          createClient(Health, createConnectTransport({ baseUrl: url, httpVersion: "2" })).check({}),
        );
        expect(err.code).toBe(Code.Internal);
      }
      expect(consoleError).not.toHaveBeenCalled();
    } finally {
      consoleError.mockRestore();
    }
    expect(lines).toHaveLength(2);
    for (const line of lines) {
      const entry = JSON.parse(line) as {
        level: number;
        method: string;
        err: { name: string; code: string };
      };
      expect(entry.level).toBe(50);
      expect(entry.method).toBe("grpc.health.v1.Health/Check");
      expect(entry.err).toEqual({ name: "SqliteError", code: "SQLITE_CONSTRAINT_UNIQUE" });
      expect(line).not.toContain(secret);
      expect(line).not.toContain("insert into");
    }
  });

  it("streams server messages and tells the handler when the client cancels", async () => {
    const { url, probe } = await served("h2c");
    const client = createClient(Health, createGrpcTransport({ baseUrl: url }));
    const abort = new AbortController();
    const first = await client
      .watch({ service: "" }, { signal: abort.signal })
      [Symbol.asyncIterator]()
      .next();
    expect(first.value?.status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    abort.abort();
    expect(await probe.watchAborted).toBe("canceled");
  });

  it("carries a bidirectional stream message by message", async () => {
    const { url } = await served("h2c");
    const client = createClient(ServerReflection, createGrpcTransport({ baseUrl: url }));
    async function* requests() {
      yield { host: "a" };
      yield { host: "b" };
    }
    const hosts: string[] = [];
    for await (const res of client.serverReflectionInfo(requests())) hosts.push(res.validHost);
    expect(hosts).toEqual(["a", "b"]);
  });

  it("accepts a gzip-compressed request", async () => {
    const { url } = await served("h2c");
    const client = createClient(
      Health,
      createConnectTransport({
        baseUrl: url,
        httpVersion: "2",
        sendCompression: compressionGzip,
        compressMinBytes: 1,
      }),
    );
    expect((await client.check({ service: "x".repeat(200) })).status).toBe(
      HealthCheckResponse_ServingStatus.SERVING,
    );
  });

  it("refuses a request larger than readMaxBytes with ResourceExhausted", async () => {
    const { url } = await served("h2c");
    const client = createClient(Health, createConnectTransport({ baseUrl: url, httpVersion: "2" }));
    const err = await client.check({ service: "x".repeat(4096) }).catch((e: unknown) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.ResourceExhausted);
  });

  it("answers 404 for a path no RPC serves", async () => {
    const { url } = await served("http1");
    const res = await fetch(`${url}/no.such.Service/Method`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    expect(res.status).toBe(404);
  });

  it("lets errorBody rewrite error bodies only, with a matching Content-Length", async () => {
    const { url } = await served("http1", (body) =>
      Buffer.from(`{"rewritten":true,${Buffer.from(body).toString("utf8").slice(1)}`),
    );
    const post = (service: string) =>
      fetch(`${url}/grpc.health.v1.Health/Check`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ service }),
      });
    const failed = await post("fail");
    const text = await failed.text();
    expect(failed.status).toBe(404);
    expect(JSON.parse(text)).toEqual({ rewritten: true, code: "not_found", message: "no such service" });
    expect(Number(failed.headers.get("content-length"))).toBe(Buffer.byteLength(text));
    const fine = await post("");
    expect(await fine.json()).toEqual({ status: "SERVING" });
  });
});
