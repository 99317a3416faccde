import { randomUUID } from "node:crypto";
import type { OutgoingHttpHeaders } from "node:http";
import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import { findTrailerError, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";
import { TesseraError, toConnectError } from "../src/errors.js";
import { augmentJsonErrorBody, refusalOnTheWire } from "../src/transport/error-wire.js";
import { nodeHeaders } from "../src/transport/unary-protocols.js";

/**
 * A refusal answered before the pipeline is written without a ConnectError (error-wire.ts).
 * What reaches the client must be exactly what Connect's writers make of the ConnectError
 * Tessera used to answer with: every header, trailer and byte.
 */

/** The Connect path, as server.ts answered early refusals before error-wire.ts (toWireError, then Connect's writers). */
function throughConnect(err: TesseraError, requestId: string, extra?: Record<string, string>) {
  const ce = toConnectError(err, requestId);
  if (extra) for (const [k, v] of Object.entries(extra)) if (!ce.metadata.has(k)) ce.metadata.set(k, v);
  const body = augmentJsonErrorBody(errorToJsonBytes(ce, {}), { reason: err.reason, requestId });
  const header: OutgoingHttpHeaders = nodeHeaders(ce.metadata);
  header["content-type"] = "application/json";
  header["content-length"] = body.byteLength;
  return { header, body, trailer: nodeHeaders(setTrailerStatus(new Headers(), ce)) };
}

const CASES: [string, () => TesseraError][] = [
  ["a bad token", () => new TesseraError("TOKEN_INVALID", "access token is invalid")],
  ["no credential", () => new TesseraError("AUTH_REQUIRED", "Authentication required")],
  [
    "missing scopes, with headers and metadata",
    () =>
      new TesseraError("ACCESS_DENIED", "Insufficient permissions", {
        headers: {
          "www-authenticate": 'Bearer realm="tessera", error="insufficient_scope", scope="a:b c:d"',
        },
        metadata: { required_scopes: "a:b c:d", other: "x" },
      }),
  ],
  [
    "a rate limit",
    () =>
      new TesseraError("RATE_LIMITED", "Too many requests. Please try again later.", {
        headers: { "retry-after": "7", "x-ratelimit-limit": "20", "x-ratelimit-remaining": "0" },
      }),
  ],
  [
    "a message needing escapes (JSON, percent-encoding, UTF-8)",
    () => new TesseraError("CREDENTIALS_INVALID", 'bad "key" \\ 100% é ✓ \n end'),
  ],
  ["an empty message", () => new TesseraError("TOKEN_EXPIRED", "")],
  ["a disabled principal", () => new TesseraError("PRINCIPAL_DISABLED", "principal is disabled")],
];

// Plain ids as server.ts makes or accepts them, and beyond: ids whose lengths need a
// two-byte varint (in the map entry, the ErrorInfo, the Any) and one JSON must escape.
const REQUEST_IDS = [
  randomUUID(),
  "r",
  "x".repeat(64),
  "client.Request-id_9",
  "y".repeat(113),
  "z".repeat(200),
  'a "quoted" id \\ é',
];

describe("refusals in wire form", () => {
  for (const [name, make] of CASES) {
    it(`writes ${name} as Connect does, for every request id`, () => {
      for (const requestId of REQUEST_IDS) {
        // Twice each: the second comes from the kept shape.
        for (let i = 0; i < 2; i++) {
          const err = make();
          const expected = throughConnect(err, requestId);
          const wire = refusalOnTheWire(err, requestId, undefined);
          expect(wire.code).toBe(err.code);
          const { header, body } = wire.connect();
          expect(Buffer.from(body).toString()).toBe(Buffer.from(expected.body).toString());
          expect(header).toEqual(expected.header);
          expect(wire.grpcTrailers()).toEqual(expected.trailer);
        }
      }
    });
  }

  it("adds the headers collected before the refusal, the error's own winning", () => {
    const extra = { "x-ratelimit-limit": "100", "x-ratelimit-remaining": "42", "retry-after": "1" };
    for (const [, make] of CASES) {
      const err = make();
      const requestId = randomUUID();
      const expected = throughConnect(err, requestId, extra);
      const wire = refusalOnTheWire(err, requestId, extra);
      expect(wire.connect().header).toEqual(expected.header);
      expect(wire.grpcTrailers()).toEqual(expected.trailer);
    }
    const limited = refusalOnTheWire(CASES[3]![1](), "id", extra).connect().header;
    expect(limited["retry-after"]).toBe("7");
    expect(limited["x-ratelimit-remaining"]).toBe("0");
  });

  it("carries each request's own id, decoded back by a Connect client", () => {
    const err = new TesseraError("TOKEN_INVALID", "access token is invalid");
    for (const requestId of REQUEST_IDS) {
      const wire = refusalOnTheWire(err, requestId, undefined);
      const json = JSON.parse(Buffer.from(wire.connect().body).toString()) as {
        request_id: string;
        details: {
          type: string;
          debug: { reason: string; domain: string; metadata: Record<string, string> };
        }[];
      };
      expect(json.request_id).toBe(requestId);
      expect(json.details[0]!.type).toBe("google.rpc.ErrorInfo");
      expect(json.details[0]!.debug).toEqual({
        reason: "TOKEN_INVALID",
        domain: "tessera.dev",
        metadata: { request_id: requestId },
      });
      const decoded = findTrailerError(new Headers(wire.grpcTrailers() as Record<string, string>));
      expect(decoded?.rawMessage).toBe("access token is invalid");
      const [info] = decoded!.findDetails(ErrorInfoSchema);
      expect(info).toMatchObject({
        reason: "TOKEN_INVALID",
        domain: "tessera.dev",
        metadata: { request_id: requestId },
      });
    }
  });

  it("writes grpc-status-details-bin as a google.rpc.Status whose one detail is a google.rpc.ErrorInfo", () => {
    const err = new TesseraError("ACCESS_DENIED", "Insufficient permissions", {
      metadata: { required_scopes: "admin:users" },
    });
    for (const requestId of REQUEST_IDS) {
      const bin = refusalOnTheWire(err, requestId, undefined).grpcTrailers()["grpc-status-details-bin"];
      const status = fromBinary(StatusSchema, Buffer.from(bin as string, "base64"));
      expect(status.code).toBe(Code.PermissionDenied);
      expect(status.message).toBe("Insufficient permissions");
      expect(status.details.map((d) => d.typeUrl)).toEqual(["type.googleapis.com/google.rpc.ErrorInfo"]);
      const info = anyUnpack(status.details[0]!, ErrorInfoSchema);
      expect(info).toMatchObject({
        reason: "ACCESS_DENIED",
        domain: "tessera.dev",
        metadata: { required_scopes: "admin:users", request_id: requestId },
      });
      // The request id is the last map entry, as toConnectError puts it.
      expect(Object.keys(info!.metadata)).toEqual(["required_scopes", "request_id"]);
    }
  });

  it("keeps refusals with different messages apart", () => {
    const a = refusalOnTheWire(new TesseraError("TOKEN_INVALID", "one"), "id", undefined);
    const b = refusalOnTheWire(new TesseraError("TOKEN_INVALID", "two"), "id", undefined);
    expect(JSON.parse(Buffer.from(a.connect().body).toString()).message).toBe("one");
    expect(JSON.parse(Buffer.from(b.connect().body).toString()).message).toBe("two");
    expect(a.grpcTrailers()["grpc-message"]).toBe("one");
    expect(b.grpcTrailers()["grpc-message"]).toBe("two");
  });
});
