import type http2 from "node:http2";
import { gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ServerReflectionRequestSchema } from "../../gen/grpc/reflection/v1/reflection_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { LoginRequestSchema, UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { REASONS } from "../../src/errors.js";
import { rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { envelope } from "./fixtures.js";

/**
 * Bad input is the client's fault: a unique constraint lost to a concurrent request is
 * AlreadyExists, and bodies that do not decompress, parse or decode are InvalidArgument
 * (with reason INVALID_ARGUMENT in the Connect JSON envelope), on every protocol, never
 * Internal.
 */

const LOGIN = "/tessera.v1.UserService/Login";

interface RawAnswer {
  status: number;
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
}

/** One raw HTTP/2 POST over TLS, as an attacker writes it. */
function post(
  ts: TestServer,
  path: string,
  headers: Record<string, string>,
  body: Uint8Array,
): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const session = ts.session();
    session.on("error", reject);
    const req = session.request({ ":method": "POST", ":path": path, ...headers });
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    req.on("response", (h) => {
      head = h;
    });
    req.on("trailers", (t) => {
      trailers = t;
    });
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      session.close();
      resolve({ status: Number(head[":status"]), headers: head, trailers, body: Buffer.concat(chunks) });
    });
    req.on("error", reject);
    req.end(body);
  });
}

/** The status and the ErrorInfo reason of a gRPC answer (trailers, or headers for a trailers-only answer). */
function grpcOutcome(res: RawAnswer): { status: string | undefined; reason: string | undefined } {
  const t = { ...res.headers, ...res.trailers };
  return { status: t["grpc-status"] as string | undefined, reason: reasonIn(t["grpc-status-details-bin"]) };
}

/** The same for a gRPC-Web answer: its trailers are a frame at the end of the body. */
function grpcWebOutcome(body: Buffer): { status: string | undefined; reason: string | undefined } {
  let at = 0;
  while (at + 5 <= body.length) {
    const flags = body[at]!;
    const length = body.readUInt32BE(at + 1);
    const data = body.subarray(at + 5, at + 5 + length);
    at += 5 + length;
    if (flags & 0x80) {
      const text = data.toString("latin1");
      return {
        status: /grpc-status:\s*(\d+)/i.exec(text)?.[1],
        reason: reasonIn(/grpc-status-details-bin:\s*(\S+)/i.exec(text)?.[1]),
      };
    }
  }
  return { status: undefined, reason: undefined };
}

/** The Tessera reason inside a google.rpc.Status (base64): the ErrorInfo's reason string, read from its bytes. */
function reasonIn(details: unknown): string | undefined {
  if (typeof details !== "string") return undefined;
  const bytes = Buffer.from(details, "base64").toString("latin1");
  return Object.keys(REASONS).find((r) => new RegExp(`[^A-Z_]${r}[^A-Z_]`).test(bytes));
}

const INVALID = { status: String(Code.InvalidArgument), reason: "INVALID_ARGUMENT" };

const login = toBinary(
  LoginRequestSchema,
  create(LoginRequestSchema, { username: "admin", password: "some password here" }),
);
/** A field announced longer than the message: fails to parse. */
const MALFORMED_PROTO = new Uint8Array([0x0a, 0x05, 0x61]);
/** A gzip stream cut short: fails to decompress with "unexpected end of file". */
const TRUNCATED_GZIP = (() => {
  const full = gzipSync(Buffer.from(login));
  return full.subarray(0, full.length - 6);
})();

describe.each(DATABASES)("bad input on $name", (db) => {
  let ts: TestServer;

  beforeAll(async () => {
    // Room in the hash pool's queue for every racer: the race is decided by the database.
    ts = await startTestServer(db, { auth: { hashQueue: 32 } });
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("answers the loser of concurrent CreateUser calls for one username AlreadyExists, never Internal", async () => {
    const { accessToken } = await createClient(UserService, ts.grpc()).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const users = clientFor(UserService, ts.connect(), accessToken);
    const username = `race-${Date.now().toString(36)}`;
    const outcomes = await Promise.allSettled(
      Array.from({ length: 8 }, () =>
        users.createUser({ username, password: "a password long enough", scopes: [] }),
      ),
    );
    const won = outcomes.filter((o) => o.status === "fulfilled");
    const lost = await Promise.all(
      outcomes
        .filter((o): o is PromiseRejectedResult => o.status === "rejected")
        .map((o) => rejection(Promise.reject(o.reason))),
    );
    expect(won).toHaveLength(1);
    expect(lost.map((r) => [r.code, r.reason])).toEqual(
      Array.from({ length: 7 }, () => [Code.AlreadyExists, "ALREADY_EXISTS"]),
    );
    // The answer names no value of the statement (the hash of the loser's password).
    for (const r of lost) expect(r.message).not.toMatch(/insert|pbkdf2|\$/i);
  });

  it("answers a value the database cannot store (an expiry in year 10000) as the client's mistake, never Internal", async () => {
    const { accessToken } = await createClient(UserService, ts.grpc()).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const tokens = clientFor(TokenService, ts.connect(), accessToken);
    const far = tokens.createPersonalAccessToken({
      name: "far future",
      scopes: [],
      expiresAt: { seconds: 253_402_300_800n, nanos: 0 },
    });
    // Past google.protobuf.Timestamp's range: refused before the database (PostgreSQL refused it
    // with SQLSTATE 22008, SQLite stored a number no reader could give back as a Timestamp).
    const r = await rejection(far);
    expect([r.code, r.reason]).toEqual([Code.InvalidArgument, "INVALID_ARGUMENT"]);
  });

  it("answers a malformed JSON body InvalidArgument with reason INVALID_ARGUMENT", async () => {
    const res = await post(ts, LOGIN, { "content-type": "application/json" }, Buffer.from('{"username": 12'));
    expect(res.status).toBe(400);
    const body = JSON.parse(res.body.toString()) as { code: string; reason: string; error: string };
    expect(body.code).toBe("invalid_argument");
    expect(body.reason).toBe("INVALID_ARGUMENT");
    expect(body.error).toBe("Bad Request");
  });

  it("answers a malformed protobuf body InvalidArgument over Connect", async () => {
    const res = await post(ts, LOGIN, { "content-type": "application/proto" }, MALFORMED_PROTO);
    expect(res.status).toBe(400);
    // A binary client's error body is JSON too, with the same envelope a JSON client gets.
    const body = JSON.parse(res.body.toString()) as {
      code: string;
      reason: string;
      request_id: string;
      details?: { type?: string; debug?: { reason?: string; metadata?: Record<string, string> } }[];
    };
    expect([body.code, body.reason, body.details?.[0]?.debug?.reason]).toEqual([
      "invalid_argument",
      "INVALID_ARGUMENT",
      "INVALID_ARGUMENT",
    ]);
    expect(body.details?.[0]?.type).toBe("google.rpc.ErrorInfo");
    expect(body.request_id).toBe(res.headers["x-request-id"]);
    expect(body.details?.[0]?.debug?.metadata?.request_id).toBe(res.headers["x-request-id"]);
  });

  it("answers a malformed protobuf message InvalidArgument over gRPC and gRPC-Web", async () => {
    const grpc = await post(
      ts,
      LOGIN,
      { "content-type": "application/grpc", te: "trailers" },
      envelope(0, MALFORMED_PROTO),
    );
    expect(grpcOutcome(grpc)).toEqual(INVALID);
    const web = await post(
      ts,
      LOGIN,
      { "content-type": "application/grpc-web+proto" },
      envelope(0, MALFORMED_PROTO),
    );
    expect(grpcWebOutcome(web.body)).toEqual(INVALID);
  });

  it("answers a truncated gzip body InvalidArgument over Connect", async () => {
    const res = await post(
      ts,
      LOGIN,
      { "content-type": "application/proto", "content-encoding": "gzip" },
      TRUNCATED_GZIP,
    );
    expect(res.status).toBe(400);
    // A binary client's error body is JSON too, with the same envelope a JSON client gets.
    const body = JSON.parse(res.body.toString()) as {
      code: string;
      reason: string;
      request_id: string;
      details?: { type?: string; debug?: { reason?: string; metadata?: Record<string, string> } }[];
    };
    expect([body.code, body.reason, body.details?.[0]?.debug?.reason]).toEqual([
      "invalid_argument",
      "INVALID_ARGUMENT",
      "INVALID_ARGUMENT",
    ]);
    expect(body.details?.[0]?.type).toBe("google.rpc.ErrorInfo");
    expect(body.request_id).toBe(res.headers["x-request-id"]);
    expect(body.details?.[0]?.debug?.metadata?.request_id).toBe(res.headers["x-request-id"]);
  });

  it("answers a truncated gzip message InvalidArgument over gRPC and gRPC-Web", async () => {
    const grpc = await post(
      ts,
      LOGIN,
      { "content-type": "application/grpc", te: "trailers", "grpc-encoding": "gzip" },
      envelope(1, TRUNCATED_GZIP),
    );
    expect(grpcOutcome(grpc)).toEqual(INVALID);
    const web = await post(
      ts,
      LOGIN,
      { "content-type": "application/grpc-web+proto", "grpc-encoding": "gzip" },
      envelope(1, TRUNCATED_GZIP),
    );
    expect(grpcWebOutcome(web.body)).toEqual(INVALID);
  });

  it("answers a truncated gzip message InvalidArgument on Connect's own handlers too (a streaming RPC)", async () => {
    const res = await post(
      ts,
      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
      { "content-type": "application/grpc", te: "trailers", "grpc-encoding": "gzip" },
      envelope(1, TRUNCATED_GZIP),
    );
    // Connect's own handler: the code is right; Tessera's reason is added on the unary handlers only.
    expect(grpcOutcome(res).status).toBe(String(Code.InvalidArgument));
  });

  it("answers a malformed protobuf message on the reflection stream InvalidArgument, not Internal (v1 and v1alpha, gRPC and Connect streaming)", async () => {
    for (const version of ["v1", "v1alpha"]) {
      const path = `/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`;
      const grpc = await post(
        ts,
        path,
        { "content-type": "application/grpc", te: "trailers" },
        envelope(0, MALFORMED_PROTO),
      );
      expect(grpcOutcome(grpc).status).toBe(String(Code.InvalidArgument));
      const connect = await post(
        ts,
        path,
        { "content-type": "application/connect+proto" },
        envelope(0, MALFORMED_PROTO),
      );
      // Connect's streaming protocol: the error is the end-stream message (flag 0b10), HTTP 200.
      expect(connect.status).toBe(200);
      expect(connect.body[0]).toBe(0b10);
      const end = JSON.parse(connect.body.subarray(5).toString()) as { error?: { code?: string } };
      expect(end.error?.code).toBe("invalid_argument");
      // A well-formed request on the same stream is still answered.
      const ok = await post(
        ts,
        path,
        { "content-type": "application/grpc", te: "trailers" },
        envelope(
          0,
          toBinary(
            ServerReflectionRequestSchema,
            create(ServerReflectionRequestSchema, {
              messageRequest: { case: "listServices", value: "" },
            }),
          ),
        ),
      );
      expect(grpcOutcome(ok).status).toBe("0");
      expect(ok.body.toString("latin1")).toContain("tessera.v1.UserService");
    }
  });

  it("still accepts a well-formed gzip body", async () => {
    const res = await post(
      ts,
      LOGIN,
      { "content-type": "application/proto", "content-encoding": "gzip" },
      gzipSync(
        toBinary(
          LoginRequestSchema,
          create(LoginRequestSchema, { username: "admin", password: ADMIN_PASSWORD }),
        ),
      ),
    );
    expect(res.status).toBe(200);
  });
});
