import type http2 from "node:http2";
import { gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LoginRequestSchema } from "../../gen/tessera/v1/user_service_pb.js";
import { Code } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";

const LOGIN = "/tessera.v1.UserService/Login";
const WATCH = "/grpc.health.v1.Health/Watch";

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

  beforeAll(async () => {
    ts = await startTestServer(db);
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
