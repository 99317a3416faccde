import http2 from "node:http2";
import https from "node:https";
import tls from "node:tls";
import { ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { Code } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { within } from "./fixtures.js";

const LOGIN = "/tessera.v1.UserService/Login";
const WATCH = "/grpc.health.v1.Health/Watch";
/** An empty HealthCheckRequest (service ""), as one gRPC envelope. */
const EMPTY_MESSAGE = Buffer.from([0, 0, 0, 0, 0]);

interface Watch {
  stream: http2.ClientHttp2Stream;
  /** The first response headers. */
  response: Promise<http2.IncomingHttpHeaders>;
  /** grpc-status once the call ends (from trailers, or headers for trailers-only), and the RST code if reset. */
  ended: Promise<{ grpcStatus: string | undefined; rstCode: number | undefined }>;
}

function watch(session: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders = {}): Watch {
  const stream = session.request({
    ":method": "POST",
    ":path": WATCH,
    "content-type": "application/grpc",
    te: "trailers",
    ...headers,
  });
  stream.on("error", () => undefined);
  let grpcStatus: string | undefined;
  const response = new Promise<http2.IncomingHttpHeaders>((resolve) =>
    stream.once("response", (h) => {
      grpcStatus = h["grpc-status"] as string | undefined;
      resolve(h);
    }),
  );
  stream.on("trailers", (t) => {
    grpcStatus = t["grpc-status"] as string | undefined;
  });
  stream.resume();
  const ended = new Promise<{ grpcStatus: string | undefined; rstCode: number | undefined }>((resolve) =>
    stream.once("close", () => resolve({ grpcStatus, rstCode: stream.rstCode })),
  );
  stream.end(EMPTY_MESSAGE);
  return { stream, response, ended };
}

describe.each(DATABASES)("bounded streams and request times on $name", (db) => {
  let ts: TestServer;
  const connect = () => {
    const s = ts.session();
    s.on("error", () => undefined);
    return s;
  };

  beforeAll(async () => {
    ts = await startTestServer(db, {
      server: { idleTimeoutSeconds: 1, requestTimeoutSeconds: 1, maxStreamSeconds: 2, maxStreamsPerIp: 3 },
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  it("ends a public Health/Watch with OK after server.maxStreamSeconds, and then closes the idle connection", async () => {
    const session = connect();
    try {
      const closed = new Promise<void>((resolve) => session.once("close", () => resolve()));
      const started = Date.now();
      const w = watch(session);
      expect((await w.response)[":status"]).toBe(200);
      const end = await within(w.ended, 6000, "the Watch outlived server.maxStreamSeconds");
      expect(end.grpcStatus).toBe("0");
      expect(Date.now() - started).toBeGreaterThanOrEqual(1900);
      await within(closed, 5000, "the connection was kept after its Watch ended");
    } finally {
      session.destroy();
    }
  });

  it("ends a Health/Watch whose deadline passed first with DEADLINE_EXCEEDED, not OK", async () => {
    const session = connect();
    try {
      const w = watch(session, { "grpc-timeout": "300m" });
      expect((await w.response)[":status"]).toBe(200);
      const end = await within(w.ended, 6000, "the Watch outlived its deadline");
      expect(end.grpcStatus).toBe(String(Code.DeadlineExceeded));
    } finally {
      session.destroy();
    }
  });

  it("cancels a Login whose body trickles in past server.requestTimeoutSeconds, and then closes the connection", async () => {
    const session = connect();
    try {
      const closed = new Promise<void>((resolve) => session.once("close", () => resolve()));
      const stream = session.request({
        ":method": "POST",
        ":path": LOGIN,
        "content-type": "application/grpc",
        te: "trailers",
      });
      stream.on("error", () => undefined);
      const reset = new Promise<number | undefined>((resolve) =>
        stream.once("close", () => resolve(stream.rstCode)),
      );
      // An envelope announcing a 16 KiB message, then a byte every 100 ms: never idle, never done.
      stream.write(Buffer.from([0, 0, 0, 0x40, 0]));
      const timer = setInterval(() => {
        if (!stream.closed && !stream.destroyed) stream.write(Buffer.from("a"));
      }, 100);
      try {
        expect(await within(reset, 5000, "the trickled upload was kept")).toBe(
          http2.constants.NGHTTP2_CANCEL,
        );
      } finally {
        clearInterval(timer);
      }
      await within(closed, 5000, "the connection was kept after its stalled call was cancelled");
    } finally {
      session.destroy();
    }
  });

  it("closes an HTTP/1.1 connection whose request body trickles in past server.requestTimeoutSeconds", async () => {
    const req = https.request(`${ts.server.url}${LOGIN}`, {
      method: "POST",
      ca: ts.certs.ca,
      agent: false,
      headers: { "content-type": "application/json", "content-length": "1000" },
    });
    req.on("error", () => undefined);
    req.on("response", (res) => res.resume());
    const closed = new Promise<void>((resolve) => req.once("close", () => resolve()));
    req.write("{");
    let sent = 1;
    const timer = setInterval(() => {
      if (!req.destroyed && sent < 999) {
        req.write(" ");
        sent++;
      }
    }, 100);
    try {
      await within(closed, 5000, "the trickled HTTP/1.1 upload was kept");
      expect(sent).toBeLessThan(999);
    } finally {
      clearInterval(timer);
      req.destroy();
    }
  });

  it("closes an HTTP/1.1 connection whose request headers trickle in past server.requestTimeoutSeconds", async () => {
    const socket = tls.connect({
      host: "127.0.0.1",
      port: ts.server.port,
      ca: ts.certs.ca,
      servername: "localhost",
      ALPNProtocols: ["http/1.1"],
    });
    socket.on("error", () => undefined);
    const answer: Buffer[] = [];
    socket.on("data", (c: Buffer) => answer.push(c));
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    await new Promise<void>((resolve) => socket.once("secureConnect", () => resolve()));
    const head = Buffer.from(`POST ${LOGIN} HTTP/1.1\r\nHost: localhost\r\nX-Pad: ${"a".repeat(250)}\r\n`);
    // A header block a byte every 50 ms (15 s in all): never idle, never done. Counted by the
    // bytes it got to send: all of them, and the server waited for the whole block.
    let sent = 0;
    let allSent: () => void = () => undefined;
    const done = new Promise<void>((resolve) => {
      allSent = resolve;
    });
    const timer = setInterval(() => {
      if (socket.destroyed) return;
      if (sent < head.byteLength) socket.write(head.subarray(sent, ++sent));
      else allSent();
    }, 50);
    try {
      await within(Promise.race([closed, done]), 20_000, "the trickle neither ended nor was cut");
      expect(sent).toBeLessThan(head.byteLength);
      expect(Buffer.concat(answer).toString("latin1")).toMatch(/^HTTP\/1\.1 408 /);
    } finally {
      clearInterval(timer);
      socket.destroy();
    }
  });

  it("refuses streaming calls beyond server.maxStreamsPerIp, over any of the address's connections, and accepts again when one ends", async () => {
    const a = connect();
    const b = connect();
    try {
      const open = [watch(a), watch(a), watch(b)];
      for (const w of open) expect((await w.response)["grpc-status"]).toBeUndefined();
      // A fourth, on either connection: ResourceExhausted at once, trailers-only (a stream held
      // until one ends would never end here: the ceiling is only for a loaded machine).
      const over = watch(b);
      expect((await within(over.ended, 10_000, "no refusal")).grpcStatus).toBe(
        String(Code.ResourceExhausted),
      );
      // Over the Connect streaming protocol too (its error in the end-stream message).
      const refused = await (async () => {
        try {
          for await (const _ of createClient(Health, ts.connect()).watch({ service: "" })) return undefined;
        } catch (e) {
          return ConnectError.from(e);
        }
        return undefined;
      })();
      expect(refused?.code).toBe(Code.ResourceExhausted);
      // One ends (the client cancels it): room for another.
      open[0]!.stream.close(http2.constants.NGHTTP2_CANCEL);
      await open[0]!.ended;
      let again = watch(b);
      for (
        const end = Date.now() + 10_000;
        (await again.response)["grpc-status"] !== undefined && Date.now() < end;
      ) {
        // The server sees the cancel a moment after the client does.
        await new Promise((r) => setTimeout(r, 20));
        again = watch(b);
      }
      expect((await again.response)["grpc-status"]).toBeUndefined();
    } finally {
      a.destroy();
      b.destroy();
    }
  });
});
