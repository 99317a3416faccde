import type http2 from "node:http2";
import https from "node:https";
import { gzipSync } from "node:zlib";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code, createClient } from "@connectrpc/connect";
import { codeFromString } from "@connectrpc/connect/protocol-connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { Health, HealthCheckRequestSchema } from "../../gen/grpc/health/v1/health_pb.js";
import { LoginRequestSchema } from "../../gen/tessera/v1/user_service_pb.js";
import { ERROR_DOMAIN } from "../../src/errors.js";
import { toClientError } from "../../src/sdk/error-mapping.js";
import { RateLimitedError } from "../../src/sdk/errors.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { captureLogs, envelope, within } from "./fixtures.js";

/**
 * Errors Connect raises itself on a unary call, before the interceptors (a body or message
 * over a limit, an encoding Tessera does not support, a gRPC body with no message or two),
 * carry Tessera's ErrorInfo like every other error: a reason and the request id (the
 * `X-Request-Id` answered), on every protocol and on both transports (the `unit` project
 * runs the fast one, `connect` connect-node's stock adapter). A size limit is
 * MESSAGE_TOO_LARGE, never RATE_LIMITED (which tells a client to retry later).
 */

const CHECK = "/grpc.health.v1.Health/Check";
const LOGIN = "/tessera.v1.UserService/Login";
const WATCH = "/grpc.health.v1.Health/Watch";
/** server.readMaxBytes here: a message over it, whose body is under server.maxBodyBytes, is refused by Connect's reader. */
const READ_MAX = 1024;
const MAX_BODY = 16 * 1024;

type Protocol = "connect-json" | "connect-proto" | "grpc" | "grpc-web";
const PROTOCOLS: readonly Protocol[] = ["connect-json", "connect-proto", "grpc", "grpc-web"];

const CONTENT_TYPE: Record<Protocol, string> = {
  "connect-json": "application/json",
  "connect-proto": "application/proto",
  grpc: "application/grpc",
  "grpc-web": "application/grpc-web+proto",
};

/** What a client reads of a failed call: its code, and its Tessera ErrorInfo if any. */
interface Outcome {
  code: Code | undefined;
  reason: string | undefined;
  requestId: string | undefined;
  /** The answer's X-Request-Id header. */
  header: string | undefined;
  /** The Connect JSON envelope's top-level fields (Connect protocol only). */
  envelope?: { reason?: string; request_id?: string; error?: string };
}

interface Raw {
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
}

/** One raw HTTP/2 POST over TLS. The server may answer before the body is sent in full: the reset that follows is expected. */
function post(ts: TestServer, path: string, headers: Record<string, string>, body: Uint8Array): Promise<Raw> {
  return new Promise((resolve, reject) => {
    const session = ts.session();
    session.on("error", () => undefined);
    const req = session.request({ ":method": "POST", ":path": path, ...headers });
    let head: http2.IncomingHttpHeaders | undefined;
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    const done = () => {
      session.close();
      if (head === undefined) reject(new Error("no answer"));
      else resolve({ headers: head, trailers, body: Buffer.concat(chunks) });
    };
    req.on("response", (h) => {
      head = h;
    });
    req.on("trailers", (t) => {
      trailers = t;
    });
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", done);
    req.on("error", () => (head === undefined ? reject(new Error("reset before an answer")) : undefined));
    req.on("close", () => (req.readableEnded ? undefined : done()));
    req.end(body);
  });
}

/** The Tessera ErrorInfo of a google.rpc.Status in base64 (grpc-status-details-bin). */
function infoOfStatus(bin: string | undefined): { reason?: string; requestId?: string } {
  if (bin === undefined) return {};
  const status = fromBinary(StatusSchema, Buffer.from(bin, "base64"));
  for (const any of status.details) {
    const info = anyUnpack(any, ErrorInfoSchema);
    if (info?.domain === ERROR_DOMAIN) return { reason: info.reason, requestId: info.metadata.request_id };
  }
  return {};
}

function outcomeOf(protocol: Protocol, raw: Raw): Outcome {
  const header = raw.headers["x-request-id"] as string | undefined;
  if (protocol === "connect-json" || protocol === "connect-proto") {
    const body = JSON.parse(raw.body.toString()) as {
      code: string;
      reason?: string;
      request_id?: string;
      error?: string;
      details?: { type?: string; value?: string }[];
    };
    const detail = body.details?.find((d) => d.type === ErrorInfoSchema.typeName);
    const info = detail?.value ? fromBinary(ErrorInfoSchema, Buffer.from(detail.value, "base64")) : undefined;
    return {
      code: codeFromString(body.code),
      reason: info?.domain === ERROR_DOMAIN ? info.reason : undefined,
      requestId: info?.metadata.request_id,
      header,
      envelope: { reason: body.reason, request_id: body.request_id, error: body.error },
    };
  }
  let t: http2.IncomingHttpHeaders = { ...raw.headers, ...raw.trailers };
  if (protocol === "grpc-web") {
    // The trailers are the body's last frame (flag 0x80): `name: value` lines; a
    // trailers-only answer has them in its headers.
    t = { ...raw.headers };
    for (let at = 0; at + 5 <= raw.body.length; ) {
      const length = raw.body.readUInt32BE(at + 1);
      if (raw.body[at]! & 0x80)
        for (const line of raw.body
          .subarray(at + 5, at + 5 + length)
          .toString("latin1")
          .split("\r\n")) {
          const colon = line.indexOf(":");
          if (colon > 0) t[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
        }
      at += 5 + length;
    }
  }
  const status = t["grpc-status"] as string | undefined;
  const info = infoOfStatus(t["grpc-status-details-bin"] as string | undefined);
  return {
    code: status === undefined ? undefined : (Number(status) as Code),
    reason: info.reason,
    requestId: info.requestId,
    header,
  };
}

/** A protobuf message whose field 1 (HealthCheckRequest.service, LoginRequest.username) is `size` bytes of "a". */
function bigMessage(size: number): Uint8Array {
  return toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service: "a".repeat(size) }));
}

/** The request of a case in `protocol`: its headers and body, made of `message` (protobuf bytes). */
function request(
  protocol: Protocol,
  message: Uint8Array,
  extra: { encoding?: string; compressed?: Uint8Array } = {},
): { headers: Record<string, string>; body: Uint8Array } {
  const headers: Record<string, string> = { "content-type": CONTENT_TYPE[protocol] };
  const connect = protocol === "connect-json" || protocol === "connect-proto";
  if (!connect) headers.te = "trailers";
  if (extra.encoding) headers[connect ? "content-encoding" : "grpc-encoding"] = extra.encoding;
  const data =
    protocol === "connect-json"
      ? Buffer.from(JSON.stringify({ service: Buffer.from(message.subarray(3)).toString() }))
      : message;
  const payload = extra.compressed ?? data;
  if (connect) return { headers, body: payload };
  return { headers, body: envelope(extra.compressed ? 1 : 0, payload) };
}

describe("errors Connect raises itself on a unary call", () => {
  let ts: TestServer;
  const logs = captureLogs("error");

  beforeAll(async () => {
    ts = await startTestServer(
      SQLITE,
      { server: { readMaxBytes: READ_MAX, maxBodyBytes: MAX_BODY } },
      undefined,
      { logger: logs.logger },
    );
  });
  afterAll(async () => {
    await ts?.close();
  });

  /** Send, then expect the code, the reason, and the request id in the ErrorInfo equal to the X-Request-Id header. */
  async function expectAnswer(
    protocol: Protocol,
    path: string,
    req: { headers: Record<string, string>; body: Uint8Array },
    code: Code,
    reason: string,
  ): Promise<Outcome> {
    const outcome = outcomeOf(protocol, await post(ts, path, req.headers, req.body));
    expect({ code: outcome.code, reason: outcome.reason }).toEqual({ code, reason });
    expect(outcome.header).toMatch(/\S/);
    expect(outcome.requestId).toBe(outcome.header);
    if (outcome.envelope) expect(outcome.envelope).toMatchObject({ reason, request_id: outcome.header });
    // The client's fault: nothing is logged as Tessera's.
    expect(logs.lines.filter((l) => (l.level as number) >= 50)).toEqual([]);
    return outcome;
  }

  describe.each(PROTOCOLS)("over %s", (protocol) => {
    it("answers a message over server.readMaxBytes ResourceExhausted with reason MESSAGE_TOO_LARGE, not RATE_LIMITED", async () => {
      await expectAnswer(
        protocol,
        CHECK,
        request(protocol, bigMessage(READ_MAX * 2)),
        Code.ResourceExhausted,
        "MESSAGE_TOO_LARGE",
      );
    });

    it("answers a body over server.maxBodyBytes ResourceExhausted with reason MESSAGE_TOO_LARGE", async () => {
      await expectAnswer(
        protocol,
        CHECK,
        request(protocol, bigMessage(MAX_BODY * 2)),
        Code.ResourceExhausted,
        "MESSAGE_TOO_LARGE",
      );
    });

    it("answers a compressed message that inflates past server.readMaxBytes ResourceExhausted with reason MESSAGE_TOO_LARGE", async () => {
      const message = bigMessage(64 * 1024);
      const compressed = gzipSync(protocol === "connect-json" ? request(protocol, message).body : message);
      expect(compressed.byteLength).toBeLessThan(READ_MAX);
      await expectAnswer(
        protocol,
        CHECK,
        request(protocol, message, { encoding: "gzip", compressed }),
        Code.ResourceExhausted,
        "MESSAGE_TOO_LARGE",
      );
    });

    it("answers an encoding Tessera does not support Unimplemented with reason UNIMPLEMENTED", async () => {
      await expectAnswer(
        protocol,
        CHECK,
        request(protocol, bigMessage(4), { encoding: "zstd" }),
        Code.Unimplemented,
        "UNIMPLEMENTED",
      );
    });

    it("answers an audited method's oversized message with reason MESSAGE_TOO_LARGE and audits it so", async () => {
      const login = toBinary(
        LoginRequestSchema,
        create(LoginRequestSchema, { username: "a".repeat(READ_MAX * 2), password: "x" }),
      );
      const req =
        protocol === "connect-json"
          ? {
              headers: { "content-type": "application/json" },
              body: Buffer.from(JSON.stringify({ username: "a".repeat(READ_MAX * 2), password: "x" })),
            }
          : request(protocol, login);
      const { header } = await expectAnswer(
        protocol,
        LOGIN,
        req,
        Code.ResourceExhausted,
        "MESSAGE_TOO_LARGE",
      );
      await ts.app.audit.flush();
      const rows = await ts.app.sql.all<Record<string, unknown>>(
        "select action, outcome, reason from audit_events where request_id = ?",
        [header],
      );
      expect(rows).toEqual([
        { action: "tessera.v1.UserService/Login", outcome: "failure", reason: "MESSAGE_TOO_LARGE" },
      ]);
    });
  });

  describe.each(["grpc", "grpc-web"] as const)("over %s", (protocol) => {
    it("answers a body with no message Unimplemented with reason UNIMPLEMENTED", async () => {
      await expectAnswer(
        protocol,
        CHECK,
        { headers: request(protocol, bigMessage(1)).headers, body: new Uint8Array(0) },
        Code.Unimplemented,
        "UNIMPLEMENTED",
      );
    });

    it("answers a body with two messages Unimplemented with reason UNIMPLEMENTED", async () => {
      const one = request(protocol, bigMessage(1));
      await expectAnswer(
        protocol,
        CHECK,
        { headers: one.headers, body: Buffer.concat([one.body, one.body]) },
        Code.Unimplemented,
        "UNIMPLEMENTED",
      );
    });
  });

  it("answers a streaming call's message over the limit with reason MESSAGE_TOO_LARGE too, not RATE_LIMITED", async () => {
    const compressed = gzipSync(bigMessage(64 * 1024));
    await expectAnswer(
      "grpc",
      WATCH,
      request("grpc", bigMessage(1), { encoding: "gzip", compressed }),
      Code.ResourceExhausted,
      "MESSAGE_TOO_LARGE",
    );
  });
});

/** The Tessera ErrorInfo and metadata of a Connect streaming answer's end-stream message (its last envelope). */
function endStreamOf(raw: Pick<Raw, "headers" | "body">): Outcome & { retryAfter: string | undefined } {
  let at = 0;
  let end: Buffer | undefined;
  while (at + 5 <= raw.body.length) {
    const length = raw.body.readUInt32BE(at + 1);
    if (raw.body[at]! & 0b10) end = raw.body.subarray(at + 5, at + 5 + length);
    at += 5 + length;
  }
  const json = JSON.parse(end?.toString() ?? "{}") as {
    error?: { code: string; details?: { type?: string; value?: string }[] };
    metadata?: Record<string, string[]>;
  };
  const detail = json.error?.details?.find((d) => d.type === ErrorInfoSchema.typeName);
  const info = detail?.value ? fromBinary(ErrorInfoSchema, Buffer.from(detail.value, "base64")) : undefined;
  return {
    code: json.error ? codeFromString(json.error.code) : undefined,
    reason: info?.domain === ERROR_DOMAIN ? info.reason : undefined,
    requestId: info?.metadata.request_id,
    header: raw.headers["x-request-id"] as string | undefined,
    retryAfter: json.metadata?.["retry-after"]?.[0],
  };
}

/** One HTTP/1.1 request over TLS: its status, headers and body. */
function h1(
  ts: TestServer,
  method: string,
  path: string,
  headers: Record<string, string>,
  body: Uint8Array,
): Promise<{ status: number | undefined; headers: http2.IncomingHttpHeaders; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = https.request(`${ts.server.url}${path}`, { method, headers, ca: ts.certs.ca }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () =>
        resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }),
      );
    });
    req.on("error", reject);
    req.end(method === "GET" ? undefined : body);
  });
}

/**
 * A streaming call past server.maxStreamsPerIp is refused before Connect sees it: with
 * RATE_LIMITED (the same call passes once one of the address's streams ends) and Retry-After,
 * and the ErrorInfo with the request id, in each streaming protocol's own place for errors.
 */
describe("a streaming call past server.maxStreamsPerIp", () => {
  let ts: TestServer;
  let held: http2.ClientHttp2Session;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { maxStreamsPerIp: 1 } });
    // The address's one stream, held open for the file's tests.
    held = ts.session();
    held.on("error", () => undefined);
    const watch = held.request({
      ":method": "POST",
      ":path": WATCH,
      ...request("grpc", bigMessage(0)).headers,
    });
    watch.on("error", () => undefined);
    const answered = new Promise((r) => watch.once("response", r));
    watch.resume();
    watch.end(request("grpc", bigMessage(0)).body);
    await within(answered, 10_000, "the first Watch was not answered");
  });
  afterAll(async () => {
    held?.destroy();
    await ts?.close();
  });

  it.each(["grpc", "grpc-web"] as const)(
    "is refused over %s trailers-only ResourceExhausted with reason RATE_LIMITED, the request id and Retry-After",
    async (protocol) => {
      const req = request(protocol, bigMessage(0));
      const raw = await within(post(ts, WATCH, req.headers, req.body), 10_000, "no refusal");
      expect(raw.body.byteLength).toBe(0);
      const outcome = outcomeOf(protocol, raw);
      expect(outcome).toMatchObject({ code: Code.ResourceExhausted, reason: "RATE_LIMITED" });
      expect(outcome.header).toMatch(/\S/);
      expect(outcome.requestId).toBe(outcome.header);
      expect(raw.headers["retry-after"]).toBe("1");
    },
  );

  it("is refused over Connect's streaming protocol (HTTP/2 and HTTP/1.1) in the end-stream message, with its ErrorInfo and Retry-After", async () => {
    const headers = { "content-type": "application/connect+json" };
    const body = envelope(0, Buffer.from("{}"));
    const overH2 = await within(post(ts, WATCH, headers, body), 10_000, "no refusal");
    const overH1 = await within(h1(ts, "POST", WATCH, headers, body), 10_000, "no refusal");
    for (const raw of [overH2, overH1]) {
      const end = endStreamOf(raw);
      expect(end).toMatchObject({ code: Code.ResourceExhausted, reason: "RATE_LIMITED", retryAfter: "1" });
      expect(end.header).toMatch(/\S/);
      expect(end.requestId).toBe(end.header);
    }
  });

  it.each(["connect", "grpc", "grpcWeb"] as const)(
    "reaches the SDK over Connect-ES's %s transport as a RateLimitedError with its reason, request id and retryAfter",
    async (kind) => {
      let thrown: unknown;
      try {
        for await (const _ of createClient(Health, ts[kind]()).watch({ service: "" })) break;
      } catch (e) {
        thrown = e;
      }
      const err = toClientError(thrown);
      expect(err).toBeInstanceOf(RateLimitedError);
      expect({ reason: err.reason, retryAfter: (err as RateLimitedError).retryAfter }).toEqual({
        reason: "RATE_LIMITED",
        retryAfter: 1,
      });
      expect(err.requestId).toMatch(/\S/);
    },
  );
});

/**
 * Answers to requests no RPC takes, before any call exists: an unknown path (404), a method
 * other than POST on a unary RPC that does not allow GET (405), a content type no protocol
 * serves (415, gRPC-Web text included: Connect's servers do not speak it). The Connect and
 * gRPC specs make these bare HTTP answers (no body; a gRPC client maps the status), so they
 * carry no ErrorInfo, only X-Request-Id; the same on both transports, HTTP/2 and HTTP/1.1.
 */
describe("requests no RPC takes", () => {
  let ts: TestServer;

  beforeAll(async () => {
    // Metrics counted (not served: the app's registry is read directly).
    ts = await startTestServer(SQLITE, { metrics: { listen: "127.0.0.1:0" } });
  });
  afterAll(async () => {
    await ts?.close();
  });

  const cases: [string, string, string, Record<string, string>, Uint8Array, number][] = [
    [
      "an unknown path over gRPC",
      "POST",
      "/nope.v1.Nope/Nope",
      { "content-type": "application/grpc", te: "trailers" },
      envelope(0, new Uint8Array(0)),
      404,
    ],
    [
      "an unknown path over Connect",
      "POST",
      "/nope.v1.Nope/Nope",
      { "content-type": "application/json" },
      Buffer.from("{}"),
      404,
    ],
    [
      "a Connect GET of a unary RPC without GET",
      "GET",
      `${CHECK}?encoding=json&message=%7B%7D`,
      {},
      new Uint8Array(0),
      405,
    ],
    ["a PUT", "PUT", CHECK, { "content-type": "application/json" }, Buffer.from("{}"), 405],
    [
      "a content type no protocol has",
      "POST",
      CHECK,
      { "content-type": "text/plain" },
      Buffer.from("{}"),
      415,
    ],
    ["no content type", "POST", CHECK, {}, Buffer.from("{}"), 415],
    [
      "gRPC-Web text",
      "POST",
      "/tessera.v1.UserService/GetCurrentUser",
      { "content-type": "application/grpc-web-text" },
      Buffer.from(envelope(0, new Uint8Array(0)).toString("base64")),
      415,
    ],
  ];

  it.each(cases)(
    "answers %s with its HTTP status, no body and X-Request-Id, over HTTP/2 and HTTP/1.1",
    async (_, method, path, headers, body, status) => {
      const session = ts.session();
      session.on("error", () => undefined);
      const overH2 = await within(
        new Promise<{ status: unknown; headers: http2.IncomingHttpHeaders; body: Buffer }>(
          (resolve, reject) => {
            const req = session.request({ ":method": method, ":path": path, ...headers });
            const chunks: Buffer[] = [];
            let head: http2.IncomingHttpHeaders = {};
            req.on("response", (h) => {
              head = h;
            });
            req.on("data", (c: Buffer) => chunks.push(c));
            req.on("end", () =>
              resolve({ status: head[":status"], headers: head, body: Buffer.concat(chunks) }),
            );
            req.on("error", reject);
            req.end(method === "GET" ? undefined : body);
          },
        ),
        10_000,
        "no answer over HTTP/2",
      ).finally(() => session.close());
      const overH1 = await within(h1(ts, method, path, headers, body), 10_000, "no answer over HTTP/1.1");
      for (const answer of [overH2, overH1]) {
        expect({ status: answer.status, body: answer.body.toString() }).toEqual({ status, body: "" });
        expect(answer.headers["x-request-id"]).toMatch(/\S/);
        expect(answer.headers["grpc-status"]).toBeUndefined();
      }
    },
  );

  it("counts a 405 or 415 as unimplemented, never as a fault of ours (unknown, INTERNAL)", async () => {
    const check = 'service="grpc.health.v1.Health",method="Check"';
    const count = async (code: string, protocol: string) => {
      const text = (await ts.app.metrics?.scrape()) ?? "";
      const line = text
        .split("\n")
        .find((l) =>
          l.startsWith(`tessera_rpc_requests_total{${check},protocol="${protocol}",code="${code}"}`),
        );
      return line === undefined ? 0 : Number(line.split(" ").pop());
    };
    const before = await count("unimplemented", "connect");
    for (const [method, headers] of [
      ["PUT", { "content-type": "application/json" }],
      ["POST", { "content-type": "text/plain" }],
    ] as const) {
      const answer = await within(h1(ts, method, CHECK, headers, Buffer.from("{}")), 10_000, "no answer");
      expect(answer.status).toBeGreaterThanOrEqual(405);
    }
    await expect.poll(() => count("unimplemented", "connect")).toBe(before + 2);
    expect(await count("unknown", "connect")).toBe(0);
  });
});
