import http2 from "node:http2";
import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { POSTGRES, startTestServer, type TestServer } from "../helpers.js";
import { envelope, within } from "./fixtures.js";

/**
 * The adversarial review of 2026-12-11 of the wire side (transport, parsing, limits), against
 * a real server over TLS, driven as an attacker would with raw node:http2 / node:https
 * clients: each test is a finding of that review, failing on the main it was found on, and
 * holds with its fix.
 */

const WATCH = "/grpc.health.v1.Health/Watch";
const CHECK = "/grpc.health.v1.Health/Check";

/** What a call was answered: its trailers (or, for Connect, its end-of-stream JSON), once it ended. */
interface Ended {
  status: number;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
}

/** A call on `session` (POST, `body` sent whole); `ended` settles when its stream ends, `first` at its first DATA. */
function call(session: http2.ClientHttp2Session, headers: Record<string, string>, body: Buffer) {
  const req = session.request({ ":method": "POST", ...headers });
  let status = 0;
  let trailers: http2.IncomingHttpHeaders = {};
  const chunks: Buffer[] = [];
  let gotFirst: () => void = () => {};
  const first = new Promise<void>((resolve) => {
    gotFirst = resolve;
  });
  req.on("response", (h) => {
    status = Number(h[":status"]);
  });
  req.on("trailers", (t) => {
    trailers = t;
  });
  req.on("data", (c: Buffer) => {
    chunks.push(c);
    gotFirst();
  });
  const ended = new Promise<Ended>((resolve, reject) => {
    req.on("end", () => resolve({ status, trailers, body: Buffer.concat(chunks) }));
    req.on("error", reject);
  });
  req.end(body);
  return { req, first, ended, isEnded: () => req.readableEnded || req.closed };
}

const grpcHeaders = (path: string, timeout: string) => ({
  ":path": path,
  "content-type": "application/grpc",
  te: "trailers",
  "grpc-timeout": timeout,
});

describe("review 2026-12-11 (wire)", () => {
  let ts: TestServer;
  let session: http2.ClientHttp2Session;
  const warnings: string[] = [];
  const onWarning = (w: Error) => {
    if (w.name === "TimeoutOverflowWarning") warnings.push(w.message);
  };

  beforeAll(async () => {
    ts = await startTestServer(POSTGRES);
    session = ts.session();
    process.on("warning", onWarning);
  });
  afterAll(async () => {
    process.off("warning", onWarning);
    session?.close();
    await ts?.close();
  });

  describe("a deadline past setTimeout's longest delay (2^31 − 1 ms, 24.8 days)", () => {
    it("does not end a Health/Watch early, over gRPC (grpc-timeout 720H) or Connect (connect-timeout-ms 9999999999)", async () => {
      const empty = envelope(0, new Uint8Array(0));
      const grpc = call(session, grpcHeaders(WATCH, "720H"), empty);
      const connect = call(
        session,
        {
          ":path": WATCH,
          "content-type": "application/connect+proto",
          "connect-protocol-version": "1",
          "connect-timeout-ms": "9999999999",
        },
        empty,
      );
      await Promise.all([grpc.first, connect.first]);
      // Given a timer of 1 ms, a Watch ends DEADLINE_EXCEEDED at its next turn, 5 s after its
      // first answer. A control Watch with a 6 s deadline, asked after both answered, ends
      // after those turns: by the time its DEADLINE_EXCEEDED arrives on this same connection,
      // theirs would have arrived before it.
      const control = call(session, grpcHeaders(WATCH, "6S"), empty);
      expect((await control.ended).trailers["grpc-status"]).toBe("4");
      expect(grpc.isEnded()).toBe(false);
      expect(connect.isEnded()).toBe(false);
      grpc.req.close();
      connect.req.close();
    });

    it("writes nothing to the server's stderr, for any protocol (a line per call an anonymous client chose)", async () => {
      warnings.length = 0;
      const unary = await call(session, grpcHeaders(CHECK, "99999999H"), envelope(0, new Uint8Array(0)))
        .ended;
      expect(unary.trailers["grpc-status"]).toBe("0");
      const connect = await call(
        session,
        {
          ":path": CHECK,
          "content-type": "application/json",
          "connect-protocol-version": "1",
          "connect-timeout-ms": "2592000000",
        },
        Buffer.from("{}"),
      ).ended;
      expect(connect.status).toBe(200);
      const stream = call(session, grpcHeaders(WATCH, "99999999H"), envelope(0, new Uint8Array(0)));
      await stream.first;
      stream.req.close();
      // process.emitWarning emits on the next tick of the call that armed the timer, long past.
      expect(warnings).toEqual([]);
    });
  });
});

/** What the server wrote back to `request`, sent raw over TLS (HTTP/1.x), until it closed the connection. */
function rawHttp1(ts: TestServer, request: string): Promise<string> {
  const { hostname, port } = new URL(ts.server.url);
  return new Promise<string>((resolve, reject) => {
    const socket = tls.connect({
      host: hostname,
      port: Number(port),
      ca: ts.certs.ca,
      servername: "localhost",
    });
    let answer = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      answer += chunk;
    });
    socket.on("close", () => resolve(answer));
    socket.on("error", reject);
    socket.on("secureConnect", () => socket.write(request));
  });
}

describe.each(["connect", "fast"] as const)("review 2026-12-11 (wire), transport %s", (transport) => {
  let ts: TestServer;
  const uncaught: unknown[] = [];
  const onUncaught = (err: unknown) => uncaught.push(err);

  beforeAll(async () => {
    ts = await startTestServer(POSTGRES, { server: { transport } });
    process.prependListener("uncaughtException", onUncaught);
  });
  afterAll(async () => {
    process.off("uncaughtException", onUncaught);
    await ts?.close();
  });

  describe("a request whose authority is missing or does not parse as a URL's host", () => {
    const LOGIN = "/tessera.v1.UserService/Login";
    const body = JSON.stringify({ username: "nobody", password: "wrong" });
    const post = (version: string, host: string | undefined) =>
      `POST ${LOGIN} HTTP/${version}\r\n${host === undefined ? "" : `Host: ${host}\r\n`}` +
      `Connection: close\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`;

    // connect-node's adapter threw from Node's request listener: the process ended (no
    // uncaughtException handler in `tessera serve`), for one anonymous request.
    it.each([
      ["HTTP/1.0 without Host", "1.0", undefined],
      ["HTTP/1.1 with Host `a b`", "1.1", "a b"],
    ])("is served, not thrown out of the request listener: %s", async (_name, version, host) => {
      const answer = await within(rawHttp1(ts, post(version, host)), 10_000, "no answer");
      expect(answer).toMatch(/^HTTP\/1\.1 401 /);
      expect(answer).toContain("CREDENTIALS_INVALID");
      expect(uncaught).toEqual([]);
    });

    it("is served over HTTP/2 too (`:authority: [`, a Health/Watch stream)", async () => {
      const session = http2.connect(ts.server.url, { ca: ts.certs.ca });
      session.on("error", () => {});
      try {
        const watch = call(
          session,
          { ":path": WATCH, ":authority": "[", "content-type": "application/grpc", te: "trailers" },
          envelope(0, new Uint8Array(0)),
        );
        await within(watch.first, 10_000, "no first answer");
        expect(uncaught).toEqual([]);
        watch.req.close();
      } finally {
        session.destroy();
      }
    });
  });
});
