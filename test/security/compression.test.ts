import type http2 from "node:http2";
import { gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LoginRequestSchema } from "../../gen/tessera/v1/user_service_pb.js";
import { Code } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";

const LOGIN = "/tessera.v1.UserService/Login";
const WATCH = "/grpc.health.v1.Health/Watch";
const CHECK = "/grpc.health.v1.Health/Check";

/** A protobuf varint. */
function varint(n: number): Buffer {
  const b: number[] = [];
  while (n > 127) {
    b.push((n & 127) | 128);
    n = Math.floor(n / 128);
  }
  b.push(n);
  return Buffer.from(b);
}

/** A message whose field 1 (Login's username, Watch's service) is `size` bytes of "a", gzipped: about 4 KiB on the wire. */
function bomb(size = 4 * 1024 * 1024 - 64): Buffer {
  const msg = Buffer.concat([Buffer.from([0x0a]), varint(size), Buffer.alloc(size, 0x61)]);
  return gzipSync(msg, { level: 9 });
}

/** One gRPC envelope, flagged compressed. */
function compressedEnvelope(data: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head[0] = 1;
  head.writeUInt32BE(data.byteLength, 1);
  return Buffer.concat([head, data]);
}

interface Answer {
  status: number;
  grpcStatus: string | undefined;
  body: string;
}

function call(
  session: http2.ClientHttp2Session,
  path: string,
  headers: Record<string, string>,
  body: Buffer,
) {
  return new Promise<Answer>((resolve, reject) => {
    const req = session.request({ ":method": "POST", ":path": path, ...headers });
    let status = 0;
    let grpcStatus: string | undefined;
    const chunks: Buffer[] = [];
    req.on("response", (h) => {
      status = Number(h[":status"]);
      grpcStatus = h["grpc-status"] as string | undefined;
    });
    req.on("trailers", (t) => {
      grpcStatus = (t["grpc-status"] as string | undefined) ?? grpcStatus;
    });
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => resolve({ status, grpcStatus, body: Buffer.concat(chunks).toString() }));
    req.on("error", reject);
    req.end(body);
  });
}

describe.each(DATABASES)("compressed request bodies on $name", (db) => {
  let ts: TestServer;
  let session: http2.ClientHttp2Session;
  const gzipBomb = bomb();
  /** The server's error lines (pino's JSON), for faults logged as Tessera's own. */
  const errors: string[] = [];

  beforeAll(async () => {
    const logger = pino({ level: "error" }, { write: (line: string) => errors.push(line) });
    ts = await startTestServer(db, {}, undefined, { logger });
    session = ts.session();
    session.on("error", () => undefined);
  });
  afterAll(async () => {
    session.destroy();
    await ts.close();
  });

  it("refuses a gzip bomb to Login over Connect with ResourceExhausted", async () => {
    expect(gzipBomb.byteLength).toBeLessThan(8 * 1024);
    const a = await call(
      session,
      LOGIN,
      { "content-type": "application/proto", "content-encoding": "gzip" },
      gzipBomb,
    );
    expect(a.status).toBe(429);
    expect(JSON.parse(a.body).code).toBe("resource_exhausted");
  });

  it("refuses a gzip bomb to Login over gRPC with ResourceExhausted", async () => {
    const a = await call(
      session,
      LOGIN,
      { "content-type": "application/grpc", "grpc-encoding": "gzip", te: "trailers" },
      compressedEnvelope(gzipBomb),
    );
    expect(a.grpcStatus).toBe(String(Code.ResourceExhausted));
  });

  it("refuses a gzip bomb to a streaming call (Connect's own handlers) with ResourceExhausted", async () => {
    const a = await call(
      session,
      WATCH,
      { "content-type": "application/grpc", "grpc-encoding": "gzip", te: "trailers" },
      compressedEnvelope(gzipBomb),
    );
    expect(a.grpcStatus).toBe(String(Code.ResourceExhausted));
  });

  it("does not grow the server's memory by the decompressed size across 100 concurrent bombs", async () => {
    // The server runs in this process: its RSS is ours. Uncapped, each bomb held 4 MiB
    // (100 of them: 400 MiB and more); capped, at most 64 KiB each.
    global.gc?.();
    const base = process.memoryUsage().rss;
    let peak = base;
    const sampler = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 2);
    try {
      const answers = await Promise.all(
        Array.from({ length: 100 }, () =>
          call(
            session,
            LOGIN,
            { "content-type": "application/grpc", "grpc-encoding": "gzip", te: "trailers" },
            compressedEnvelope(gzipBomb),
          ),
        ),
      );
      for (const a of answers) expect(a.grpcStatus).toBe(String(Code.ResourceExhausted));
    } finally {
      clearInterval(sampler);
    }
    peak = Math.max(peak, process.memoryUsage().rss);
    expect((peak - base) / 2 ** 20).toBeLessThan(64);
  });

  it("answers an envelope flagged compressed without a negotiated encoding as the client's fault: InvalidArgument, neither logged nor counted as Internal", async () => {
    // Health/Check is unary, Health/Watch a stream (Connect's own handlers on both transports).
    const flagged = compressedEnvelope(gzipSync(Buffer.alloc(0)));
    const endStream = (body: string) => JSON.parse(body.slice(body.lastIndexOf('{"error"')));
    errors.length = 0;
    for (const encoding of [{}, { "grpc-encoding": "identity" }] as Record<string, string>[]) {
      for (const path of [CHECK, WATCH]) {
        const grpc = await call(
          session,
          path,
          { "content-type": "application/grpc", te: "trailers", ...encoding },
          flagged,
        );
        expect(grpc.grpcStatus).toBe(String(Code.InvalidArgument));
        const web = await call(
          session,
          path,
          { "content-type": "application/grpc-web+proto", ...encoding },
          flagged,
        );
        expect(web.body).toContain(`grpc-status: ${Code.InvalidArgument}\r\n`);
      }
    }
    for (const encoding of [{}, { "connect-content-encoding": "identity" }] as Record<string, string>[]) {
      const connect = await call(
        session,
        WATCH,
        { "content-type": "application/connect+proto", ...encoding },
        flagged,
      );
      expect(endStream(connect.body).error.code).toBe("invalid_argument");
    }
    expect(errors).toEqual([]);
    const scraped = await ts.app.metrics!.scrape();
    expect(scraped).toMatch(/tessera_rpc_requests_total\{[^}]*code="invalid_argument"[^}]*\} [1-9]/);
    expect(scraped).not.toMatch(/tessera_rpc_requests_total\{[^}]*code="internal"/);
  });

  it("names an unsupported encoding's refusal by its code (UNIMPLEMENTED, 501), not as Tessera's fault", async () => {
    const message = toBinary(
      LoginRequestSchema,
      create(LoginRequestSchema, { username: "x", password: "y" }),
    );
    const unary = await call(
      session,
      LOGIN,
      { "content-type": "application/proto", "content-encoding": "zstd" },
      Buffer.from(message),
    );
    expect(unary.status).toBe(501);
    const body = JSON.parse(unary.body);
    expect([body.code, body.reason, body.error]).toEqual([
      "unimplemented",
      "UNIMPLEMENTED",
      "Not Implemented",
    ]);
    const stream = await call(
      session,
      WATCH,
      { "content-type": "application/connect+proto", "connect-content-encoding": "zstd" },
      Buffer.from([0, 0, 0, 0, 0]),
    );
    const end = JSON.parse(stream.body.slice(stream.body.indexOf('{"error"'))).error;
    expect([end.code, end.details[0].debug.reason]).toEqual(["unimplemented", "UNIMPLEMENTED"]);
  });

  it("still accepts a small compressed message", async () => {
    const a = await call(
      session,
      LOGIN,
      { "content-type": "application/proto", "content-encoding": "gzip" },
      gzipSync(
        toBinary(LoginRequestSchema, create(LoginRequestSchema, { username: "nobody", password: "wrong" })),
      ),
    );
    // Decompressed and parsed: a wrong login, not a refusal of its size.
    expect(a.status).toBe(401);
    expect(JSON.parse(a.body).code).toBe("unauthenticated");
  });
});
