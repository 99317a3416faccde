import type http2 from "node:http2";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import {
  ServerReflectionRequestSchema,
  ServerReflectionResponseSchema,
} from "../../gen/grpc/reflection/v1/reflection_pb.js";
import { Code } from "../errors-util.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { envelope, within } from "./fixtures.js";

/*
 * gRPC server reflection is public and bidi: admission counts the call once, and each of its
 * request messages (a few bytes) is answered with the files it names (tens of KB). One
 * stream within server.maxBodyBytes made the server answer thousands of them.
 */

const REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const HEALTH_CHECK = "/grpc.health.v1.Health/Check";

/** `n` requests for the file of UserService, as one gRPC body. */
function symbolRequests(n: number): Buffer {
  const one = envelope(
    0,
    toBinary(
      ServerReflectionRequestSchema,
      create(ServerReflectionRequestSchema, {
        messageRequest: { case: "fileContainingSymbol", value: "tessera.v1.UserService" },
      }),
    ),
  );
  return Buffer.concat(Array.from({ length: n }, () => one));
}

interface Outcome {
  /** Reflection answers received (data envelopes that decode as a response). */
  answers: number;
  grpcStatus: string | undefined;
  reason: string | undefined;
}

/** A gRPC call on its own connection, its whole body sent at once, with its answers counted. */
function grpcCall(ts: TestServer, path: string, body: Buffer): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const session = ts.session();
    session.on("error", reject);
    const req = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": "application/grpc",
      te: "trailers",
    });
    let meta: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    req.on("response", (h) => {
      meta = h;
    });
    req.on("trailers", (t) => {
      meta = { ...meta, ...t };
    });
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("error", reject);
    req.on("close", () => {
      session.close();
      const all = Buffer.concat(chunks);
      let answers = 0;
      for (let at = 0; at + 5 <= all.length; ) {
        const length = all.readUInt32BE(at + 1);
        fromBinary(ServerReflectionResponseSchema, all.subarray(at + 5, at + 5 + length));
        answers++;
        at += 5 + length;
      }
      const details = meta["grpc-status-details-bin"];
      const status =
        typeof details === "string" ? fromBinary(StatusSchema, Buffer.from(details, "base64")) : undefined;
      const info = status?.details.find((d) => d.typeUrl.endsWith("google.rpc.ErrorInfo"));
      resolve({
        answers,
        grpcStatus: meta["grpc-status"] as string | undefined,
        reason: info ? fromBinary(ErrorInfoSchema, info.value).reason : undefined,
      });
    });
    req.end(body);
  });
}

describe("the request messages of one reflection stream", () => {
  describe("past server.maxStreamMessages", () => {
    let ts: TestServer;
    beforeAll(async () => {
      ts = await startTestServer(SQLITE, { server: { maxStreamMessages: 5 } });
    });
    afterAll(async () => {
      await ts.close();
    });

    it("are not answered: the stream ends ResourceExhausted (MESSAGE_TOO_LARGE) after the limit's answers", async () => {
      const out = await within(
        grpcCall(ts, REFLECTION, symbolRequests(200)),
        10_000,
        "the reflection stream",
      );
      expect(out.answers).toBe(5);
      expect(out.grpcStatus).toBe(String(Code.ResourceExhausted));
      expect(out.reason).toBe("MESSAGE_TOO_LARGE");
    });

    it("up to it, are all answered", async () => {
      const out = await within(grpcCall(ts, REFLECTION, symbolRequests(5)), 10_000, "the reflection stream");
      expect(out).toEqual({ answers: 5, grpcStatus: "0", reason: undefined });
    });
  });

  describe("with rate limits on", () => {
    let ts: TestServer;
    beforeAll(async () => {
      ts = await startTestServer(SQLITE, {
        server: { maxStreamMessages: 0 },
        rateLimit: { enabled: true, perIpPerMinute: 10 },
      });
    });
    afterAll(async () => {
      await ts.close();
    });

    it("count against the caller's per-IP budget, each after the first as a call of its own", async () => {
      // The call counts 1 at admission, its messages 2 to 10 count 9: the budget of 10 is spent.
      const out = await within(grpcCall(ts, REFLECTION, symbolRequests(50)), 10_000, "the reflection stream");
      expect(out.answers).toBe(10);
      expect(out.grpcStatus).toBe(String(Code.ResourceExhausted));
      expect(out.reason).toBe("RATE_LIMITED");
      // The address's budget is spent for any other call too.
      const next = await grpcCall(ts, HEALTH_CHECK, envelope(0, new Uint8Array()));
      expect(next.grpcStatus).toBe(String(Code.ResourceExhausted));
      expect(next.reason).toBe("RATE_LIMITED");
    });
  });
});
