import { readFileSync } from "node:fs";
import http2 from "node:http2";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  type HandlerContext,
  type Interceptor,
} from "@connectrpc/connect";
import { codeFromString } from "@connectrpc/connect/protocol-connect";
import { compressionBrotli, compressionGzip, connectNodeAdapter } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import {
  Health,
  HealthCheckRequestSchema,
  HealthCheckResponse_ServingStatus,
} from "../gen/grpc/health/v1/health_pb.js";
import { setResponseHeaders } from "../src/transport/call-context.js";
import { type ConnectHandler, createConnectHandler } from "../src/transport/fast-adapter.js";
import { createTransport, installTransport, type TransportKind } from "../src/transport/index.js";
import { serveRequests } from "../src/transport/stream-server.js";
import { createTestCerts } from "./helpers.js";

/**
 * src/transport/unary-protocols.ts serves unary calls over Connect, gRPC and gRPC-Web in place of
 * Connect's own handlers. These tests send the same raw HTTP/2 requests to connect-node's
 * stock adapter and to Tessera's, both serving the same router, and require the same
 * status, headers, body bytes and trailers: for successes and for every way a unary call
 * fails (implementation, interceptor, body, compression, limits, timeouts, framing).
 */

const signals: AbortSignal[] = [];
const aborts: Code[] = [];
/** The reasons a "wait" call's signal was aborted with. */
const abortReasons: unknown[] = [];
const contexts: HandlerContext[] = [];
/** The calls whose implementation has started ("wait", "late", "slow"), and those that ended ("slow"). */
const entered: string[] = [];
const ended: string[] = [];
/**
 * What "late" and "slow" wait for before they go on: 150 ms, or, while a test sets `held`,
 * that promise (the test lets them go once the server has seen the client reset the stream,
 * which a fixed time cannot promise on a loaded machine).
 */
let held: Promise<void> | undefined;
const pause = () => held ?? new Promise<void>((resolve) => setTimeout(resolve, 150));
/** Streams the test servers have seen closed, reset by their client among them. */
let serverStreamsClosed = 0;

/** Wait (polling, up to 10 s) until `done()` holds; else fail naming `what`. */
async function until(done: () => boolean, what: string): Promise<void> {
  for (const end = Date.now() + 10_000; !done(); ) {
    if (Date.now() > end) throw new Error(`${what} within 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
/** What the interceptor and the implementation of a "members" call saw, in that order. */
const members: Record<string, unknown>[] = [];
/** The signal the interceptor saw on a "members" call without `x-spread`. */
let interceptedSignal: AbortSignal | undefined;

/**
 * Adds a header and a trailer to calls that carry `x-decorate` (as the implementation
 * does), and refuses calls that carry `x-refuse`. With
 * `x-spread`, it passes on a copy of the request (`{ ...req }`) without reading its
 * signal; otherwise, on a "members" call, it records what it sees.
 */
const interceptor: Interceptor = (next) => async (req) => {
  if (req.header.get("x-refuse") !== null) {
    throw new ConnectError("interceptor says no", Code.PermissionDenied, { "x-why": "asked" });
  }
  const spread = req.header.get("x-spread") !== null;
  if (!spread && req.header.get("x-members") !== null) {
    interceptedSignal = req.signal;
    members.push({
      stream: req.stream,
      message: req.stream ? "stream" : req.message.$typeName,
      method: req.method.name,
      service: req.service.typeName,
      requestMethod: req.requestMethod,
      path: new URL(req.url).pathname,
      header: req.header.get("x-members"),
      contextValues: typeof req.contextValues.get,
      signal: req.signal instanceof AbortSignal && !req.signal.aborted,
    });
  }
  const res = await next(spread ? { ...req } : req);
  // As the error interceptor sets the rate-limit headers: names out of order, with
  // `x-set-headers: odd` a name and a value the Headers normalise, with `numbers` values
  // given as numbers (as the rate-limit headers are).
  const set = req.header.get("x-set-headers");
  if (set !== null)
    setResponseHeaders(
      res,
      set === "odd"
        ? { "x-z": "1", "X-Upper": " spaced value " }
        : set === "numbers"
          ? { "x-z": 1, "x-a": 2, "x-m": -3.5 }
          : { "x-z": "1", "x-a": "2", "x-m": "3" },
    );
  if (req.header.get("x-decorate") !== null) {
    res.header.set("x-intercepted", "1");
    res.trailer.set("x-checked", "yes");
  }
  return res;
};

function routes(router: ConnectRouter) {
  router.service(Health, {
    check(req, ctx) {
      if (ctx.requestHeader.get("x-decorate") !== null) {
        ctx.responseHeader.set("x-impl", "check");
        ctx.responseTrailer.append("x-trail", "a");
        ctx.responseTrailer.append("x-trail", "b");
      }
      switch (req.service) {
        case "fail":
          throw new ConnectError("no such service", Code.NotFound);
        case "refuse":
          throw new ConnectError(
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
        case "crash":
          throw new Error("an unexpected failure with a detail that must not leave the server");
        case "wait":
          // Until the deadline passes or the client goes away; the reason is the answer.
          entered.push(req.service);
          return new Promise((_, reject) => {
            const done = () => {
              aborts.push(ConnectError.from(ctx.signal.reason).code);
              abortReasons.push(ctx.signal.reason);
              reject(ctx.signal.reason);
            };
            if (ctx.signal.aborted) done();
            else ctx.signal.addEventListener("abort", done, { once: true });
          });
        case "late":
          // Reads the signal for the first time only after a while.
          contexts.push(ctx);
          entered.push(req.service);
          return pause().then(() => {
            const signal = ctx.signal;
            if (!signal.aborted) return { status: HealthCheckResponse_ServingStatus.SERVING };
            aborts.push(ConnectError.from(signal.reason).code);
            throw signal.reason;
          });
        case "members":
          contexts.push(ctx);
          members.push({
            method: ctx.method.name,
            service: ctx.service.typeName,
            requestMethod: ctx.requestMethod,
            path: new URL(ctx.url).pathname,
            requestHeader: ctx.requestHeader.get("x-members"),
            protocolName: ctx.protocolName,
            timeoutMs: typeof ctx.timeoutMs(),
            values: typeof ctx.values.get,
            signal: ctx.signal instanceof AbortSignal && !ctx.signal.aborted,
            sameSignal: interceptedSignal === undefined || ctx.signal === interceptedSignal,
          });
          return { status: HealthCheckResponse_ServingStatus.SERVING };
        case "slow":
          // Never reads the signal; ends after the test had time to reset the stream.
          contexts.push(ctx);
          entered.push(req.service);
          return pause().then(() => {
            ended.push(req.service);
            return { status: HealthCheckResponse_ServingStatus.SERVING };
          });
        case "untouched":
          contexts.push(ctx);
          return { status: HealthCheckResponse_ServingStatus.SERVING };
        case "deadline":
          return {
            status:
              ctx.timeoutMs() === undefined
                ? HealthCheckResponse_ServingStatus.UNKNOWN
                : HealthCheckResponse_ServingStatus.SERVING,
          };
        default:
          signals.push(ctx.signal);
          return { status: HealthCheckResponse_ServingStatus.SERVING };
      }
    },
    async *watch(req, ctx) {
      // Two updates, then the end of the stream (or the error the request asks for).
      yield { status: HealthCheckResponse_ServingStatus.SERVING };
      if (req.service === "wait") {
        // Ends without an error once its signal aborts (at the deadline), as Tessera's streams do.
        await new Promise((resolve) => {
          if (ctx.signal.aborted) resolve(undefined);
          else ctx.signal.addEventListener("abort", resolve, { once: true });
        });
        return;
      }
      yield { status: HealthCheckResponse_ServingStatus.NOT_SERVING };
      if (req.service === "fail")
        throw new ConnectError("watch failed", Code.Unavailable, { "x-why": "end" });
    },
    list() {
      // Large enough to be compressed (compressMinBytes is 1 KiB by default).
      const statuses: Record<string, { status: HealthCheckResponse_ServingStatus }> = {};
      for (let i = 0; i < 200; i++)
        statuses[`service-${i}`] = { status: HealthCheckResponse_ServingStatus.SERVING };
      return { statuses };
    },
  });
}

const options = {
  routes,
  interceptors: [interceptor],
  readMaxBytes: 2048,
  acceptCompression: [compressionGzip, compressionBrotli],
};

interface Answer {
  status: number;
  headers: Record<string, unknown>;
  body: string;
  trailers: Record<string, unknown>;
}

interface Server {
  session: http2.ClientHttp2Session;
  close(): Promise<void>;
}

/** A server for `handler`: through the "request" event, or installed with serveRequests (`direct`). */
async function start(
  handler: (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void,
  direct?: ConnectHandler,
) {
  const server = http2.createServer();
  if (direct) serveRequests(server, direct);
  else server.on("request", handler);
  server.on("stream", (stream) => stream.once("close", () => serverStreamsClosed++));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const session = http2.connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
  return {
    session,
    close: () =>
      new Promise<void>((resolve) => {
        session.close();
        server.close(() => resolve());
      }),
  };
}

/**
 * Hold "late" and "slow" calls from now on; the function returned waits until the server has
 * seen one more stream closed (the client's reset), then lets them go on.
 */
function holdUntilReset(): () => Promise<void> {
  let go!: () => void;
  held = new Promise<void>((resolve) => {
    go = resolve;
  });
  const closed = serverStreamsClosed;
  return async () => {
    try {
      await until(() => serverStreamsClosed > closed, "the server did not see the stream reset");
    } finally {
      held = undefined;
      go();
    }
  };
}

/**
 * One raw call: what came back, with the Date header left out. Sends `body` at once, or
 * lets `body` write it to the stream (and end it).
 */
function call(
  server: Server,
  path: string,
  headers: http2.OutgoingHttpHeaders,
  body: Uint8Array | ((stream: http2.ClientHttp2Stream) => void),
) {
  return new Promise<Answer>((resolve, reject) => {
    const stream = server.session.request({ ":method": "POST", ":path": path, ...headers });
    stream.setTimeout(5000, () => {
      stream.close(http2.constants.NGHTTP2_CANCEL);
      reject(new Error(`no answer from ${path} within 5 s`));
    });
    const chunks: Buffer[] = [];
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    stream.on("response", (h) => (head = h));
    stream.on("trailers", (t) => (trailers = t));
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", reject);
    stream.on("end", () => {
      const { ":status": status, date: _date, ...rest } = head;
      resolve({
        status: Number(status),
        headers: rest,
        body: Buffer.concat(chunks).toString("hex"),
        trailers,
      });
    });
    if (typeof body === "function") body(stream);
    else stream.end(body);
  });
}

function envelope(flags: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(5 + data.byteLength);
  out[0] = flags;
  new DataView(out.buffer).setUint32(1, data.byteLength);
  out.set(data, 5);
  return out;
}

const concat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
const json = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
const proto = (service: string) =>
  toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service }));

type Wire = "connect+json" | "connect+proto" | "grpc" | "grpc+json" | "grpc-web" | "grpc-web+json";
const wires: Wire[] = ["connect+json", "connect+proto", "grpc", "grpc+json", "grpc-web", "grpc-web+json"];

const contentType: Record<Wire, string> = {
  "connect+json": "application/json",
  "connect+proto": "application/proto",
  grpc: "application/grpc",
  "grpc+json": "application/grpc+json",
  "grpc-web": "application/grpc-web+proto",
  "grpc-web+json": "application/grpc-web+json",
};

const isJson = (wire: Wire) => wire.endsWith("json");
const isConnect = (wire: Wire) => wire.startsWith("connect");

/** The serialized request message for `service` in the wire's format. */
function message(wire: Wire, service: string): Uint8Array {
  return isJson(wire) ? json({ service }) : proto(service);
}

/** A well-formed request body carrying `data` (enveloped for gRPC and gRPC-Web). */
function body(wire: Wire, data: Uint8Array, flags = 0): Uint8Array {
  return isConnect(wire) ? data : envelope(flags, data);
}

const gzipped = (data: Uint8Array) => new Uint8Array(gzipSync(data));

/** An empty request message, gzip-compressed (and enveloped, flagged compressed, for gRPC and gRPC-Web). */
function gzipBody(wire: Wire): Uint8Array {
  const compressed = new Uint8Array(gzipSync(isJson(wire) ? json({}) : new Uint8Array(0)));
  return isConnect(wire) ? compressed : envelope(1, compressed);
}

/** Headers naming the wire's compression, timeout and accepted encodings. */
function headers(wire: Wire, extra: { encoding?: string; accept?: string; timeout?: string } = {}) {
  const h: http2.OutgoingHttpHeaders = { "content-type": contentType[wire] };
  if (wire.startsWith("grpc")) h.te = "trailers";
  if (extra.encoding) h[isConnect(wire) ? "content-encoding" : "grpc-encoding"] = extra.encoding;
  if (extra.accept) h[isConnect(wire) ? "accept-encoding" : "grpc-accept-encoding"] = extra.accept;
  if (extra.timeout) h[isConnect(wire) ? "connect-timeout-ms" : "grpc-timeout"] = extra.timeout;
  return h;
}

const CHECK = "/grpc.health.v1.Health/Check";
const LIST = "/grpc.health.v1.Health/List";
const WATCH = "/grpc.health.v1.Health/Watch";

let reference: Server;
let tessera: Server;
/** Tessera's adapter as Tessera's server installs it: unary calls served from the HTTP/2 stream, without the compatibility layer. */
let direct: Server;
let compatWrites = 0;
/** Requests the direct server handed to the adapter through the compatibility layer. */
let compatRequests = 0;

beforeAll(async () => {
  reference = await start(connectNodeAdapter(options));
  const handler = createConnectHandler(options);
  tessera = await start((req, res) => {
    // Counts the answers written through the compatibility layer's writeHead.
    const writeHead = res.writeHead;
    res.writeHead = ((...args: Parameters<typeof writeHead>) => {
      compatWrites++;
      return writeHead.apply(res, args);
    }) as typeof writeHead;
    handler(req, res);
  });
  const streams = createConnectHandler(options);
  const counted = ((req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
    compatRequests++;
    streams(req, res);
  }) as ConnectHandler;
  counted.stream = streams.stream;
  direct = await start(counted, counted);
});

afterAll(async () => {
  await reference.close();
  await tessera.close();
  await direct.close();
});

/**
 * The same call to the three servers: the answers must be identical (`adjust`, when given,
 * turns the reference's answer into the one expected where Tessera's differs on purpose).
 */
async function same(
  path: string,
  h: http2.OutgoingHttpHeaders,
  b: Uint8Array,
  adjust?: (answer: Answer) => Answer,
): Promise<Answer> {
  const [reference_, actual, streamed] = await Promise.all([
    call(reference, path, h, b),
    call(tessera, path, h, b),
    call(direct, path, h, b),
  ]);
  const expected = adjust ? adjust(reference_) : reference_;
  expect(actual).toEqual(expected);
  expect(streamed).toEqual(expected);
  return actual;
}

/**
 * Connect's answer to a request message that does not parse as protobuf binary, as Tessera
 * gives it: InvalidArgument where Connect says Internal ("parse binary: …", the same
 * message), because the bytes are the client's (malformed JSON is InvalidArgument in
 * Connect already). Everything else is Connect's.
 */
function parseFailureAsClientFault(wire: Wire): (answer: Answer) => Answer {
  return (answer) => (isJson(wire) ? answer : internalAsClientFault(answer));
}

/**
 * Connect's answer with its Internal status as InvalidArgument (the same message), as
 * Tessera answers Connect's Internal errors about the request's bytes (client-faults.ts):
 * a Connect unary error's status and body, gRPC's trailers, the status in a gRPC-Web
 * trailer frame or a Connect end-stream message. Everything else is Connect's.
 */
function internalAsClientFault(answer: Answer): Answer {
  const bytes = Buffer.from(answer.body, "hex");
  const isFramed = answer.headers["content-type"] !== "application/json";
  if (!isFramed) {
    const body = Buffer.from(
      bytes.toString("utf8").replace('"code":"internal"', '"code":"invalid_argument"'),
    );
    return {
      ...answer,
      status: answer.status === 500 ? 400 : answer.status,
      headers: { ...answer.headers, "content-length": String(body.byteLength) },
      body: body.toString("hex"),
    };
  }
  const trailers = { ...answer.trailers };
  if (trailers["grpc-status"] === "13") trailers["grpc-status"] = "3";
  // gRPC-Web's trailer frame (0x80) and Connect's end-stream message (0x02) end the body.
  const frames: Buffer[] = [];
  for (let at = 0; at + 5 <= bytes.length; ) {
    const flags = bytes[at]!;
    const length = bytes.readUInt32BE(at + 1);
    let data = bytes.subarray(at + 5, at + 5 + length);
    if (flags & 0x82)
      data = Buffer.from(
        data
          .toString("latin1")
          .replace("grpc-status: 13", "grpc-status: 3")
          .replace('"code":"internal"', '"code":"invalid_argument"'),
        "latin1",
      );
    frames.push(Buffer.from(envelope(flags, data)));
    at += 5 + length;
  }
  return { ...answer, trailers, body: Buffer.concat(frames).toString("hex") };
}

/** The status code a call ended with, from its answer in any protocol (0 for OK). */
function endCode(answer: Answer): number {
  if (answer.trailers["grpc-status"] !== undefined) return Number(answer.trailers["grpc-status"]);
  const bytes = Buffer.from(answer.body, "hex");
  if (answer.headers["content-type"] === "application/json")
    return codeFromString((JSON.parse(bytes.toString("utf8")) as { code: string }).code) ?? -1;
  for (let at = 0; at + 5 <= bytes.length; ) {
    const flags = bytes[at]!;
    const length = bytes.readUInt32BE(at + 1);
    const data = bytes.subarray(at + 5, at + 5 + length).toString("utf8");
    if (flags & 0x80) return Number(/grpc-status: (\d+)/.exec(data)?.[1] ?? -1);
    if (flags & 0x02) {
      const end = JSON.parse(data) as { error?: { code: string } };
      return end.error ? (codeFromString(end.error.code) ?? -1) : 0;
    }
    at += 5 + length;
  }
  return Number(answer.headers["grpc-status"] ?? -1);
}

describe.each(wires)("unary calls over %s answer as Connect's handlers do", (wire) => {
  it("on success, with nothing set by the interceptors or the implementation", async () => {
    const answer = await same(CHECK, headers(wire), body(wire, message(wire, "")));
    expect(answer.status).toBe(200);
    expect(answer.headers["x-intercepted"]).toBeUndefined();
  });

  it("on success, with the implementation's and the interceptor's headers and trailers", async () => {
    const decorated = { ...headers(wire), "x-decorate": "1" };
    const answer = await same(CHECK, decorated, body(wire, message(wire, "")));
    expect(answer.status).toBe(200);
    expect(answer.headers["x-intercepted"]).toBe("1");
    expect(answer.headers["x-impl"]).toBe("check");
    if (isConnect(wire)) expect(answer.headers["trailer-x-checked"]).toBe("yes");
    else if (wire.startsWith("grpc-web"))
      expect(answer.body).toContain(Buffer.from("x-checked: yes").toString("hex"));
    else expect(answer.trailers["x-checked"]).toBe("yes");
  });

  it.each(["fail", "refuse", "crash"])("when the implementation throws (%s)", async (service) => {
    const decorated = { ...headers(wire), "x-decorate": "1" };
    const answer = await same(CHECK, decorated, body(wire, message(wire, service)));
    expect(answer.body + JSON.stringify(answer.trailers)).not.toContain("must not leave");
  });

  it.each(["plain", "odd", "numbers"])(
    "on success, with headers an interceptor set with setResponseHeaders (%s)",
    async (kind) => {
      for (const decorate of [{}, { "x-decorate": "1" }]) {
        const sent = { ...headers(wire), "x-set-headers": kind, ...decorate };
        const answer = await same(CHECK, sent, body(wire, message(wire, "")));
        expect(answer.status).toBe(200);
        expect(answer.headers["x-z"]).toBe("1");
        if (kind === "odd") expect(answer.headers["x-upper"]).toBe("spaced value");
        else expect(answer.headers["x-a"]).toBe("2");
        if (kind === "numbers") expect(answer.headers["x-m"]).toBe("-3.5");
      }
    },
  );

  it("when an interceptor refuses", async () => {
    await same(CHECK, { ...headers(wire), "x-refuse": "1" }, body(wire, message(wire, "")));
  });

  it("with a malformed message", async () => {
    const bad = isJson(wire)
      ? new TextEncoder().encode('{"service": 12')
      : new Uint8Array([0x0a, 0x05, 0x61]);
    await same(CHECK, headers(wire), body(wire, bad), parseFailureAsClientFault(wire));
  });

  it("with a gzip-compressed request and a compressed response", async () => {
    const answer = await same(LIST, headers(wire, { encoding: "gzip", accept: "gzip" }), gzipBody(wire));
    expect(answer.status).toBe(200);
    expect(answer.headers[isConnect(wire) ? "content-encoding" : "grpc-encoding"]).toBe("gzip");
  });

  it("with an unsupported request compression: Unimplemented, naming the encodings accepted", async () => {
    // gRPC's compression.md and the Connect protocol both ask for this code and list.
    const answer = await same(CHECK, headers(wire, { encoding: "zstd" }), body(wire, message(wire, "")));
    expect(endCode(answer)).toBe(Code.Unimplemented);
    const accepted = isConnect(wire)
      ? answer.headers["accept-encoding"]
      : wire.startsWith("grpc-web")
        ? /grpc-accept-encoding: ([^\r]*)/.exec(Buffer.from(answer.body, "hex").toString("latin1"))?.[1]
        : answer.trailers["grpc-accept-encoding"];
    expect(accepted).toBe("gzip,br");
  });

  it("with a protocol header sent twice", async () => {
    // Read from Node's headers by the unary handlers, from fetch Headers by Connect's.
    const h = headers(wire, { encoding: "gzip" });
    h[isConnect(wire) ? "accept-encoding" : "grpc-accept-encoding"] = ["zstd", "gzip"];
    const answer = await same(LIST, h, gzipBody(wire));
    expect(answer.headers[isConnect(wire) ? "content-encoding" : "grpc-encoding"]).toBe("gzip");
  });

  it("with a valid and with an invalid timeout", async () => {
    const valid = isConnect(wire) ? "5000" : "5S";
    const answer = await same(
      CHECK,
      headers(wire, { timeout: valid }),
      body(wire, message(wire, "deadline")),
    );
    expect(answer.status).toBe(200);
    await same(CHECK, headers(wire, { timeout: "soon" }), body(wire, message(wire, "deadline")));
  });

  it("when the deadline passes during the call, and when it has passed on arrival", async () => {
    const [short, none] = isConnect(wire) ? ["30", "0"] : ["30m", "0n"];
    const answer = await same(CHECK, headers(wire, { timeout: short }), body(wire, message(wire, "wait")));
    if (isConnect(wire)) expect(answer.status).toBe(504);
    else if (wire.startsWith("grpc-web"))
      expect(answer.body).toContain(Buffer.from("grpc-status: 4").toString("hex"));
    else expect(answer.trailers["grpc-status"]).toBe("4");
    await same(CHECK, headers(wire, { timeout: none }), body(wire, message(wire, "wait")));
  });

  it("with a body over readMaxBytes", async () => {
    await same(CHECK, headers(wire), body(wire, message(wire, "x".repeat(4000))));
  });

  it("with a body over readMaxBytes once decompressed", async () => {
    const data = message(wire, "y".repeat(8000));
    const compressed = new Uint8Array(gzipSync(data));
    const b = isConnect(wire) ? compressed : envelope(1, compressed);
    await same(CHECK, headers(wire, { encoding: "gzip" }), b);
  });
});

describe.each(wires.filter((w) => !isConnect(w)))("enveloped bodies over %s", (wire) => {
  const m = () => message(wire, "");
  it.each([
    ["no message", () => new Uint8Array(0)],
    ["two messages", () => concat(envelope(0, m()), envelope(0, m()))],
    [
      "a message, then a malformed one",
      () => concat(envelope(0, m()), envelope(0, new Uint8Array([0x0a, 0x09]))),
    ],
    ["an incomplete envelope", () => envelope(0, m()).subarray(0, 4)],
    ["a message and a partial envelope", () => concat(envelope(0, m()), new Uint8Array([0, 0]))],
    ["a message announced over readMaxBytes", () => new Uint8Array([0, 0, 0, 0x10, 0])],
    [
      "a message with a trailer frame after it",
      () => concat(envelope(0, m()), envelope(0x80, new Uint8Array(0))),
    ],
  ])("with %s", async (label, make) => {
    const adjust = label.includes("malformed") ? parseFailureAsClientFault(wire) : undefined;
    await same(CHECK, headers(wire), make(), adjust);
  });

  it.each([
    ["without an encoding", undefined],
    ["with the identity encoding", "identity"],
  ])(
    "with a compressed envelope %s: InvalidArgument, where Connect says Internal",
    async (_label, encoding) => {
      const h = headers(wire, encoding ? { encoding } : {});
      const answer = await same(CHECK, h, envelope(1, gzipped(m())), internalAsClientFault);
      expect(endCode(answer)).toBe(Code.InvalidArgument);
    },
  );

  it("with a message split across many DATA frames", async () => {
    const h = headers(wire);
    const data = envelope(0, message(wire, "z".repeat(600)));
    // Three bytes per DATA frame, each written after the previous one went out.
    const trickle = (stream: http2.ClientHttp2Stream) => {
      let i = 0;
      const next = () => {
        if (i >= data.byteLength) {
          stream.end();
          return;
        }
        stream.write(data.subarray(i, i + 3), () => setImmediate(next));
        i += 3;
      };
      next();
    };
    const send = (server: Server) => call(server, CHECK, h, trickle);
    const [expected, actual, streamed] = await Promise.all([send(reference), send(tessera), send(direct)]);
    expect(actual).toEqual(expected);
    expect(streamed).toEqual(expected);
    expect(actual.status).toBe(200);
  });
});

/** A gRPC Check of `service` to `server`, reset by the client with `rst` once its implementation runs. */
async function resetCall(server: Server, service: string, rst: number): Promise<void> {
  entered.length = 0;
  const stream = server.session.request({ ":method": "POST", ":path": CHECK, ...headers("grpc") });
  stream.on("error", () => undefined);
  stream.end(body("grpc", proto(service)));
  await until(() => entered.length > 0, "the implementation did not start");
  stream.close(rst);
}

describe("the unary handlers", () => {
  it("give a signal first read after the deadline passed in the state Connect's would be in", async () => {
    for (const wire of wires) {
      const timeout = isConnect(wire) ? "30" : "30m";
      const answer = await same(CHECK, headers(wire, { timeout }), body(wire, message(wire, "late")));
      if (isConnect(wire)) expect(answer.status).toBe(504);
    }
  });

  it.each([
    ["wait", "abort the call's signal with Canceled when the client goes away, as Connect's do"],
    ["late", "give a signal first read after the client went away in the state Connect's would be in"],
  ])("(%s) %s", async (service) => {
    for (const server of [reference, tessera, direct]) {
      aborts.length = 0;
      const reset = holdUntilReset();
      await resetCall(server, service, http2.constants.NGHTTP2_CANCEL);
      await reset();
      await until(() => aborts.length > 0, "the signal was not aborted");
      expect(aborts).toEqual([Code.Canceled]);
    }
  });

  it.each([
    ["NO_ERROR", 0x0],
    ["PROTOCOL_ERROR", 0x1],
    ["STREAM_CLOSED", 0x5],
    ["REFUSED_STREAM", 0x7],
    ["CANCEL", 0x8],
    ["ENHANCE_YOUR_CALM", 0xb],
    ["INADEQUATE_SECURITY", 0xc],
    ["HTTP_1_1_REQUIRED", 0xd],
  ])(
    "abort the call's signal as connect-node does when the client resets the stream with %s",
    async (_name, rst) => {
      const seen: { code: Code; message: string | undefined }[] = [];
      for (const server of [reference, tessera, direct]) {
        abortReasons.length = 0;
        await resetCall(server, "wait", rst);
        await until(() => abortReasons.length > 0, "the signal was not aborted");
        const reason = abortReasons[0];
        // connect-node aborts with no reason (an AbortError) for the codes it does not map.
        seen.push({
          code: ConnectError.from(reason).code,
          message: reason instanceof ConnectError ? reason.rawMessage : undefined,
        });
      }
      const [expected, ...actual] = seen;
      for (const a of actual) {
        expect(a.code).toBe(expected!.code);
        if (expected!.message !== undefined) expect(a.message).toBe(expected!.message);
      }
    },
  );

  it("give a signal first read after a call the client left in the state Connect's would be in", async () => {
    for (const server of [reference, tessera, direct]) {
      contexts.length = 0;
      ended.length = 0;
      const reset = holdUntilReset();
      await resetCall(server, "slow", http2.constants.NGHTTP2_CANCEL);
      await reset();
      // The call goes on to its end; its signal is read only then.
      await until(() => ended.length > 0, "the call did not end");
      expect(contexts).toHaveLength(1);
      const reason = contexts[0]?.signal.reason as unknown;
      // The client's leaving (not the call's end, an AbortError) is why the signal aborted.
      expect(reason).toBeInstanceOf(ConnectError);
      expect((reason as ConnectError).code).toBe(Code.Canceled);
    }
  });

  it("give a signal first read after the call ended as aborted, as Connect's", async () => {
    for (const server of [reference, tessera, direct]) {
      contexts.length = 0;
      await call(server, CHECK, headers("connect+json"), json({ service: "untouched" }));
      await call(server, CHECK, headers("grpc"), body("grpc", proto("untouched")));
      expect(contexts.map((c) => c.signal.aborted)).toEqual([true, true]);
      expect(contexts.map((c) => (c.signal.reason as DOMException).name)).toEqual([
        "AbortError",
        "AbortError",
      ]);
      // Ours: the shared reason a finished call ends with, not one made when the signal was read.
      if (server !== reference) expect(contexts[0]?.signal.reason).toBe(contexts[1]?.signal.reason);
    }
  });

  it.each([
    ["", "give the interceptors and the implementation what Connect's give them"],
    [
      "x-spread",
      "give the implementation the call's signal when an interceptor passed on a copy of the request",
    ],
  ])("(%s) %s", async (spread) => {
    const seen: Record<string, unknown>[][] = [];
    for (const server of [reference, tessera, direct]) {
      members.length = 0;
      contexts.length = 0;
      interceptedSignal = undefined;
      const h = { ...headers("grpc"), "x-members": "yes", ...(spread ? { [spread]: "1" } : {}) };
      const answer = await call(server, CHECK, h, body("grpc", proto("members")));
      expect(answer.trailers["grpc-status"]).toBe("0");
      // A live signal during the call, aborted once it ended.
      expect(contexts.map((c) => c.signal.aborted)).toEqual([true]);
      seen.push([...members]);
    }
    expect(seen[0]).toHaveLength(spread ? 1 : 2);
    expect(seen[1]).toEqual(seen[0]);
    expect(seen[2]).toEqual(seen[0]);
    for (const m of [...seen[1]!, ...seen[2]!]) expect(m.signal).toBe(true);
  });

  it("write answers with only the protocol's headers and trailers straight onto the HTTP/2 stream", async () => {
    for (const wire of wires) {
      compatWrites = 0;
      const plain = await call(tessera, CHECK, headers(wire), body(wire, message(wire, "")));
      expect(plain.status).toBe(200);
      expect(compatWrites).toBe(0);
      // Headers the implementation set go through Node's checks (and so through writeHead).
      const decorated = { ...headers(wire), "x-decorate": "1" };
      const other = await call(tessera, CHECK, decorated, body(wire, message(wire, "")));
      expect(other.headers["x-impl"]).toBe("check");
      expect(compatWrites).toBe(1);
      // Headers of plain names and values set with setResponseHeaders are checked already.
      const set = { ...headers(wire), "x-set-headers": "plain" };
      const limited = await call(tessera, CHECK, set, body(wire, message(wire, "")));
      expect(limited.headers["x-a"]).toBe("2");
      expect(compatWrites).toBe(1);
      // And numbers, as the rate-limit headers are set: written as their text.
      const numbers = { ...headers(wire), "x-set-headers": "numbers" };
      const counted = await call(tessera, CHECK, numbers, body(wire, message(wire, "")));
      expect(counted.headers["x-m"]).toBe("-3.5");
      expect(compatWrites).toBe(1);
    }
  });

  it("installed with serveRequests, answer unary POSTs from the stream and leave the rest to the compatibility layer", async () => {
    compatRequests = 0;
    for (const wire of wires) {
      const answer = await same(CHECK, headers(wire), body(wire, message(wire, "")));
      expect(answer.status).toBe(200);
    }
    expect(compatRequests).toBe(0);
    // An unknown path, a content type no protocol has and gRPC-Web text (served by Connect's handlers) are requests as ever.
    const unknown = await same("/nope.v1.Nope/Nope", headers("grpc"), body("grpc", proto("")));
    expect(unknown.status).toBe(404);
    const plain = await same(CHECK, { ...headers("connect+json"), "content-type": "text/plain" }, json({}));
    expect(plain.status).toBe(415);
    const text = { ...headers("grpc-web"), "content-type": "application/grpc-web-text" };
    await same(CHECK, text, new Uint8Array(0));
    expect(compatRequests).toBe(3);
  });

  it("serve unary calls in place of Connect's: a finished call's signal is aborted with one shared reason", async () => {
    signals.length = 0;
    await call(tessera, CHECK, headers("grpc"), body("grpc", proto("")));
    await call(tessera, CHECK, headers("connect+json"), json({}));
    const [first, second] = signals;
    expect(first?.aborted).toBe(true);
    expect(second?.aborted).toBe(true);
    expect((first?.reason as DOMException | undefined)?.name).toBe("AbortError");
    expect(first?.reason).toBe(second?.reason);
    // Connect's own handlers abort each call with a new DOMException.
    signals.length = 0;
    await call(reference, CHECK, headers("grpc"), body("grpc", proto("")));
    await call(reference, CHECK, headers("connect+json"), json({}));
    expect(signals[0]?.reason).not.toBe(signals[1]?.reason);
  });
});

/**
 * The transport boundary (src/transport/index.ts) over TLS, as Tessera's server installs it:
 * both `server.transport` kinds, and connect-node's stock adapter as the reference, on the
 * same router, over HTTP/2 and HTTP/1.1 (allowHTTP1), for unary and server-streaming calls.
 */
describe("over TLS, both transports answer as connect-node's adapter does", () => {
  interface TlsServer {
    port: number;
    session: http2.ClientHttp2Session;
    close(): Promise<void>;
  }
  let ca: Buffer;
  const servers: Partial<Record<TransportKind | "reference", TlsServer>> = {};
  const kinds = ["reference", "fast", "connect"] as const;

  beforeAll(async () => {
    const certs = await createTestCerts();
    ca = certs.ca;
    const key = readFileSync(join(certs.dir, "server.key"));
    const cert = readFileSync(join(certs.dir, "server.crt"));
    for (const kind of kinds) {
      const server = http2.createSecureServer({ key, cert, allowHTTP1: true });
      // The transports with Tessera's compression (gzip and br, a body that does not
      // decompress answered as the client's fault: fast-adapter.ts), as its server has them.
      if (kind === "reference") server.on("request", connectNodeAdapter(options));
      else installTransport(server, createTransport(kind, { ...options, acceptCompression: undefined }));
      await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
      const port = (server.address() as AddressInfo).port;
      const session = http2.connect(`https://localhost:${port}`, { ca });
      servers[kind] = {
        port,
        session,
        close: () =>
          new Promise<void>((resolve) => {
            session.close();
            server.close(() => resolve());
          }),
      };
    }
  });

  afterAll(async () => {
    for (const kind of kinds) await servers[kind]?.close();
  });

  /** One HTTP/1.1 call over TLS: status, headers (Date and connection management left out), body. */
  function call1(port: number, path: string, h: http2.OutgoingHttpHeaders, b: Uint8Array) {
    return new Promise<Answer>((resolve, reject) => {
      const req = https.request(
        {
          host: "127.0.0.1",
          port,
          path,
          method: "POST",
          ca,
          servername: "localhost",
          agent: false,
          headers: h,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("error", reject);
          res.on("end", () => {
            const { date: _date, connection: _connection, "keep-alive": _keepAlive, ...rest } = res.headers;
            resolve({
              status: res.statusCode ?? 0,
              headers: rest,
              body: Buffer.concat(chunks).toString("hex"),
              trailers: res.trailers,
            });
          });
        },
      );
      req.on("error", reject);
      req.end(b);
    });
  }

  /** The same call to the three servers (HTTP/2, or HTTP/1.1 with `h1`): the answers must be identical. */
  async function sameTls(
    path: string,
    h: http2.OutgoingHttpHeaders,
    b: Uint8Array,
    o: { h1?: boolean; adjust?: (answer: Answer) => Answer } = {},
  ): Promise<Answer> {
    const [expected_, fast, connect] = await Promise.all(
      kinds.map((kind) => {
        const server = servers[kind]!;
        return o.h1 ? call1(server.port, path, h, b) : call(server as unknown as Server, path, h, b);
      }),
    );
    const expected = o.adjust ? o.adjust(expected_!) : expected_!;
    expect(fast).toEqual(expected);
    expect(connect).toEqual(expected);
    return fast!;
  }

  describe.each(wires)("unary calls over %s", (wire) => {
    for (const h1 of [false, true]) {
      // gRPC needs HTTP/2 trailers: over HTTP/1.1 only Connect and gRPC-Web are spoken.
      if (h1 && wire.startsWith("grpc") && !wire.startsWith("grpc-web")) continue;
      const over = h1 ? "HTTP/1.1" : "HTTP/2";
      it(`over ${over}: on success, with headers and trailers set`, async () => {
        const decorated = { ...headers(wire), "x-decorate": "1" };
        const answer = await sameTls(CHECK, decorated, body(wire, message(wire, "")), { h1 });
        expect(answer.status).toBe(200);
        expect(answer.headers["x-intercepted"]).toBe("1");
      });

      it(`over ${over}: when an interceptor refuses and when the implementation throws`, async () => {
        const refused = await sameTls(
          CHECK,
          { ...headers(wire), "x-refuse": "1" },
          body(wire, message(wire, "")),
          {
            h1,
          },
        );
        if (isConnect(wire)) expect(refused.status).toBe(403);
        await sameTls(CHECK, headers(wire), body(wire, message(wire, "refuse")), { h1 });
      });

      it(`over ${over}: with a malformed message and with a body over readMaxBytes`, async () => {
        const garbage = isJson(wire) ? json("not an object") : new Uint8Array([0x0a, 0xff]);
        await sameTls(CHECK, headers(wire), body(wire, garbage), {
          h1,
          adjust: parseFailureAsClientFault(wire),
        });
        const big = body(wire, message(wire, "x".repeat(4096)));
        const answer = await sameTls(CHECK, headers(wire), big, { h1 });
        if (isConnect(wire)) expect(answer.status).toBe(429);
      });

      it(`over ${over}: with a body not compressed as its headers say`, async () => {
        // An envelope flagged compressed without a negotiated encoding is the client's fault.
        if (!isConnect(wire)) {
          const flagged = envelope(1, gzipped(message(wire, "x")));
          const answer = await sameTls(CHECK, headers(wire), flagged, { h1, adjust: internalAsClientFault });
          expect(endCode(answer)).toBe(Code.InvalidArgument);
        }
        const truncated = gzipped(message(wire, "x")).subarray(0, -4);
        const corrupt = await sameTls(
          CHECK,
          headers(wire, { encoding: "gzip" }),
          isConnect(wire) ? truncated : envelope(1, truncated),
          { h1, adjust: internalAsClientFault },
        );
        expect(endCode(corrupt)).toBe(Code.InvalidArgument);
        // An encoding the server does not support: Unimplemented, as gRPC and Connect ask.
        const zstd = headers(wire, { encoding: "zstd" });
        const unsupported = await sameTls(CHECK, zstd, body(wire, message(wire, "x")), { h1 });
        expect(endCode(unsupported)).toBe(Code.Unimplemented);
      });
    }
  });

  /** The streaming content type of a wire (Connect's streaming protocol for the Connect wires). */
  const streamType = (wire: Wire) =>
    isConnect(wire) ? `application/connect+${isJson(wire) ? "json" : "proto"}` : contentType[wire];

  describe.each(wires)("a server-streaming call over %s", (wire) => {
    const h = () => ({ ...headers(wire), "content-type": streamType(wire) });
    it("ends with OK after its messages, over HTTP/2", async () => {
      const answer = await sameTls(WATCH, h(), envelope(0, message(wire, "")));
      expect(answer.status).toBe(200);
      expect(answer.body.length).toBeGreaterThan(0);
    });

    it("ends with the implementation's error after its messages, over HTTP/2", async () => {
      const answer = await sameTls(WATCH, h(), envelope(0, message(wire, "fail")));
      expect(answer.status).toBe(200);
    });

    it("ends with InvalidArgument on a body not compressed as its headers say, over HTTP/2", async () => {
      const flagged = envelope(1, gzipped(message(wire, "x")));
      const answer = await sameTls(WATCH, h(), flagged, { adjust: internalAsClientFault });
      expect(endCode(answer)).toBe(Code.InvalidArgument);
      const identity = {
        ...h(),
        [isConnect(wire) ? "connect-content-encoding" : "grpc-encoding"]: "identity",
      };
      const named = await sameTls(WATCH, identity, flagged, { adjust: internalAsClientFault });
      expect(endCode(named)).toBe(Code.InvalidArgument);
      const gzip = { ...h(), [isConnect(wire) ? "connect-content-encoding" : "grpc-encoding"]: "gzip" };
      const truncated = envelope(1, gzipped(message(wire, "x")).subarray(0, -4));
      const corrupt = await sameTls(WATCH, gzip, truncated, { adjust: internalAsClientFault });
      expect(endCode(corrupt)).toBe(Code.InvalidArgument);
    });

    it("ends as connect-node's adapter does once its deadline passed (the DeadlineExceeded is the error interceptor's)", async () => {
      // Tessera's answer, DeadlineExceeded with its ErrorInfo, comes from the app's error
      // interceptor (interceptors/index.ts), the same on both transports; proven end to end
      // by watch-revocations-aborts.test.ts and security/streams.test.ts (Health/Watch).
      const timeout = isConnect(wire) ? { "connect-timeout-ms": "200" } : { "grpc-timeout": "200m" };
      const [reference, fast, connect] = await Promise.all(
        kinds.map((kind) =>
          call(
            servers[kind] as unknown as Server,
            WATCH,
            { ...h(), ...timeout },
            envelope(0, message(wire, "wait")),
          ),
        ),
      );
      expect(endCode(reference!)).toBe(0);
      expect(connect).toEqual(fast);
      expect(endCode(fast!)).toBe(0);
    });

    if (!wire.startsWith("grpc") || wire.startsWith("grpc-web"))
      it("ends with OK after its messages, over HTTP/1.1", async () => {
        const answer = await sameTls(WATCH, h(), envelope(0, message(wire, "")), { h1: true });
        expect(answer.status).toBe(200);
      });
  });
});
