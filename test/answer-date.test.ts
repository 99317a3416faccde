import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it, type MockInstance, vi } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

/**
 * HTTP/2 answers carry their `date` header from Tessera (src/transport/answer-date.ts), so
 * node:http2's `processHeaders` never adds one (the store that kept it in V8's baseline
 * tier). Headers are contracts: the fields on the wire, their order and the date's format
 * are as node:http2 made them before.
 */

interface WireAnswer {
  /** The answer's header fields as they came off the wire, in order: [name, value, …]. */
  raw: string[];
  trailers: http2.IncomingHttpHeaders;
}

function wireCall(
  session: http2.ClientHttp2Session,
  path: string,
  headers: Record<string, string>,
  body: Uint8Array,
): Promise<WireAnswer> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ":method": "POST", ":path": path, ...headers });
    let raw: string[] = [];
    let trailers: http2.IncomingHttpHeaders = {};
    // node:http2 passes the field list as received after the header object and the flags.
    stream.on("response", (_h: unknown, _flags: unknown, fields: string[]) => {
      raw = fields;
    });
    stream.on("trailers", (t) => {
      trailers = t;
    });
    stream.on("data", () => {});
    stream.on("end", () => resolve({ raw, trailers }));
    stream.on("error", reject);
    stream.end(body);
  });
}

function names(answer: WireAnswer): string[] {
  return answer.raw.filter((_, i) => i % 2 === 0);
}

function valuesOf(answer: WireAnswer, name: string): string[] {
  return answer.raw.filter((_, i) => i % 2 === 1 && answer.raw[i - 1] === name);
}

/** The prototype of node:http2's server streams, from a throwaway h2c server. */
async function serverStreamPrototype(): Promise<{ respond: http2.ServerHttp2Stream["respond"] }> {
  const probe = http2.createServer();
  await new Promise<void>((r) => probe.listen(0, "127.0.0.1", r));
  const { port } = probe.address() as AddressInfo;
  const client = http2.connect(`http://127.0.0.1:${port}`);
  try {
    return await new Promise((resolve, reject) => {
      client.on("error", reject);
      probe.once("stream", (stream) => {
        resolve(Object.getPrototypeOf(stream));
        stream.respond({ ":status": 204 }, { endStream: true });
      });
      const req = client.request({ ":path": "/" });
      req.on("error", reject);
      req.resume();
      req.end();
    });
  } finally {
    client.close();
    probe.close();
  }
}

const GET_CURRENT_USER = "/tessera.v1.UserService/GetCurrentUser";
const EMPTY_FRAME = Uint8Array.of(0, 0, 0, 0, 0);
/** Node's own `date` value: `Date#toUTCString`, an IMF-fixdate. */
const IMF_FIXDATE = /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$/;
const SECURED = [
  "x-request-id",
  "x-content-type-options",
  "x-frame-options",
  "x-xss-protection",
  "content-security-policy",
  "strict-transport-security",
];

describe("the date of HTTP/2 answers", () => {
  let ts: TestServer;
  let session: http2.ClientHttp2Session;
  let adminToken: string;
  let respond: MockInstance<http2.ServerHttp2Stream["respond"]>;
  const forged = { authorization: "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl" };

  beforeAll(async () => {
    respond = vi.spyOn(await serverStreamPrototype(), "respond");
    ts = await startTestServer(SQLITE);
    session = http2.connect(ts.server.url, { ca: ts.certs.ca });
    adminToken = (
      await createClient(UserService, ts.connect()).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
  });
  afterAll(async () => {
    respond.mockRestore();
    session?.close();
    await ts?.close();
  });

  // [case, request headers, body, the answer's header names after :status and the security headers]
  const cases: [string, () => Record<string, string>, Uint8Array, string[]][] = [
    [
      "a Connect JSON answer",
      () => ({ "content-type": "application/json", authorization: `Bearer ${adminToken}` }),
      Buffer.from("{}"),
      ["content-type", "content-length", "date"],
    ],
    [
      "a Connect proto answer",
      () => ({ "content-type": "application/proto", authorization: `Bearer ${adminToken}` }),
      new Uint8Array(0),
      ["content-type", "content-length", "date"],
    ],
    [
      "a gRPC answer",
      () => ({ "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${adminToken}` }),
      EMPTY_FRAME,
      ["content-type", "date"],
    ],
    [
      "a gRPC-Web answer",
      () => ({ "content-type": "application/grpc-web+proto", authorization: `Bearer ${adminToken}` }),
      EMPTY_FRAME,
      ["content-type", "date"],
    ],
    [
      "a Connect refusal answered early",
      () => ({ "content-type": "application/json", ...forged }),
      Buffer.from("{}"),
      ["www-authenticate", "content-type", "content-length", "date"],
    ],
    [
      "a gRPC refusal answered early",
      () => ({ "content-type": "application/grpc", te: "trailers", ...forged }),
      EMPTY_FRAME,
      ["content-type", "date"],
    ],
  ];

  it.each(cases)("hands node:http2 %s with its date, last", async (_name, headers, body) => {
    respond.mockClear();
    await wireCall(session, GET_CURRENT_USER, headers(), body);
    expect(respond).toHaveBeenCalledTimes(1);
    const given = respond.mock.calls[0]![0] as Record<string, unknown>;
    expect(Object.keys(given).at(-1)).toBe("date");
    expect(given.date).toMatch(IMF_FIXDATE);
  });

  it.each(cases)(
    "writes %s with the header fields node:http2 wrote before",
    async (_name, headers, body, rest) => {
      const before = Date.now();
      const answer = await wireCall(session, GET_CURRENT_USER, headers(), body);
      expect(names(answer)).toEqual([":status", ...SECURED, ...rest]);
      const [date, ...more] = valuesOf(answer, "date");
      expect(more).toEqual([]);
      expect(date).toMatch(IMF_FIXDATE);
      // The second the answer was made in (the header's resolution is a second).
      const at = Date.parse(date!);
      expect(at).toBeGreaterThanOrEqual(Math.floor(before / 1000) * 1000);
      expect(at).toBeLessThanOrEqual(Date.now());
    },
  );
});
