import http2 from "node:http2";
import https from "node:https";
import net from "node:net";
import tls from "node:tls";
import { create, toBinary } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LoginRequestSchema } from "../../gen/tessera/v1/user_service_pb.js";
import { budgetKey } from "../../src/client-ip.js";
import { Code } from "../errors-util.js";
import { ADMIN_PASSWORD, DATABASES, SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { envelope, within } from "./fixtures.js";

const LOGIN = "/tessera.v1.UserService/Login";
const GET_CURRENT_USER = "/tessera.v1.UserService/GetCurrentUser";

/** What a call whose body the client keeps sending came to. */
interface Upload {
  status: number;
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
  /** The RST_STREAM code the server closed the stream with (undefined: it read the body to its end). */
  rstCode: number | undefined;
  /** Bytes the client had written when the stream closed. */
  sent: number;
}

/**
 * A call whose body is `first`, then `chunk` again and again (every few ms, never ending
 * unless `total` is reached), as a client still uploading when the server answers.
 */
function upload(
  session: http2.ClientHttp2Session,
  path: string,
  headers: Record<string, string>,
  first: Buffer,
  chunk: Buffer,
  total = Number.POSITIVE_INFINITY,
): Promise<Upload> {
  return new Promise((resolve) => {
    const stream = session.request({ ":method": "POST", ":path": path, ...headers });
    let status = 0;
    let responseHeaders: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    let sent = 0;
    stream.on("response", (h) => {
      status = Number(h[":status"]);
      responseHeaders = h;
    });
    stream.on("trailers", (t) => {
      trailers = t;
    });
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", () => undefined);
    let timer: NodeJS.Timeout | undefined;
    const done = () => {
      clearInterval(timer);
      const rstCode = stream.rstCode;
      resolve({ status, headers: responseHeaders, trailers, body: Buffer.concat(chunks), rstCode, sent });
      stream.destroy();
    };
    // "aborted": a reset while this side was still writing (then "close" may not come).
    stream.once("close", done);
    stream.once("aborted", done);
    stream.write(first);
    sent += first.byteLength;
    timer = setInterval(() => {
      if (stream.destroyed || stream.closed) return;
      if (sent >= total) {
        clearInterval(timer);
        stream.end();
        return;
      }
      stream.write(chunk);
      sent += chunk.byteLength;
    }, 2);
  });
}

/** The grpc-status of a gRPC-Web answer: its trailer frame (flag 0x80) at the end of the body. */
function grpcWebStatus(body: Buffer): string | undefined {
  let at = 0;
  while (at + 5 <= body.byteLength) {
    const len = body.readUInt32BE(at + 1);
    if (body[at] === 0x80)
      return /grpc-status: ?(\d+)/.exec(body.subarray(at + 5, at + 5 + len).toString())?.[1];
    at += 5 + len;
  }
  return undefined;
}

/** A TLS connection (ALPN h2) to the server: accepted once the handshake completes, or closed before. */
function openTls(ts: TestServer): Promise<{ socket: tls.TLSSocket; accepted: boolean }> {
  return new Promise((resolve) => {
    const socket = tls.connect({
      host: "127.0.0.1",
      port: ts.server.port,
      ca: ts.certs.ca,
      servername: "localhost",
      ALPNProtocols: ["h2"],
    });
    socket.on("error", () => undefined);
    socket.once("secureConnect", () => resolve({ socket, accepted: true }));
    socket.once("close", () => resolve({ socket, accepted: false }));
  });
}

const LOOPBACK = "127.0.0.1";

/**
 * Wait until the server's count of connections from this host satisfies `ok` (it sees a
 * close a moment after the client does); fails with the count it is stuck at.
 */
async function countDrops(ts: TestServer, ok: (n: number) => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!ok(ts.server.connectionsFrom(LOOPBACK))) {
    if (Date.now() > deadline)
      throw new Error(
        `the server still counts ${ts.server.connectionsFrom(LOOPBACK)} connections from ${LOOPBACK}`,
      );
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe.each(DATABASES)("the total connection limit on $name", (db) => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(db, { server: { maxConnections: 3, maxConnectionsPerIp: 0 } });
  });
  afterAll(async () => {
    await ts.close();
  });

  it("closes connections beyond server.maxConnections at once", async () => {
    const held: tls.TLSSocket[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        const c = await openTls(ts);
        expect(c.accepted).toBe(true);
        held.push(c.socket);
      }
      const over = await within(openTls(ts), 5000, "a connection over the limit was left hanging");
      expect(over.accepted).toBe(false);
    } finally {
      for (const s of held) s.destroy();
    }
  });
});

describe.each(DATABASES)("bounded connections and bodies on $name", (db) => {
  let ts: TestServer;
  const connect = () => ts.session();

  beforeAll(async () => {
    ts = await startTestServer(db, {
      server: { idleTimeoutSeconds: 1, maxConnectionsPerIp: 4, maxBodyBytes: 64 * 1024 },
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  it("sends GOAWAY to an HTTP/2 connection that stays idle past the configured timeout, then closes it", async () => {
    const session = connect();
    session.on("error", () => undefined);
    try {
      const goaway = new Promise<number>((resolve) =>
        session.once("goaway", (code: number) => resolve(code)),
      );
      const closed = new Promise<void>((resolve) => session.once("close", () => resolve()));
      await new Promise<void>((resolve) => session.once("connect", () => resolve()));
      const opened = Date.now();
      expect(await within(goaway, 5000, "no GOAWAY for an idle connection")).toBe(
        http2.constants.NGHTTP2_NO_ERROR,
      );
      expect(Date.now() - opened).toBeGreaterThanOrEqual(900);
      await within(closed, 5000, "the idle connection was not closed");
    } finally {
      session.destroy();
    }
  });

  it("keeps a connection busy with a call past the idle timeout and answers it", async () => {
    const session = connect();
    session.on("error", () => undefined);
    try {
      // A call whose body trickles in for 1.5 s (longer than the idle timeout) is not cut.
      const started = Date.now();
      const message = envelope(
        0,
        toBinary(
          LoginRequestSchema,
          create(LoginRequestSchema, { username: "admin", password: ADMIN_PASSWORD }),
        ),
      );
      const stream = session.request({
        ":method": "POST",
        ":path": LOGIN,
        "content-type": "application/grpc",
        te: "trailers",
      });
      const trailers = new Promise<http2.IncomingHttpHeaders>((resolve) => stream.once("trailers", resolve));
      stream.resume();
      let i = 0;
      const timer = setInterval(
        () => {
          if (i < message.byteLength) stream.write(message.subarray(i, ++i));
          if (i >= message.byteLength || Date.now() - started > 1500) {
            clearInterval(timer);
            stream.end(message.subarray(i));
          }
        },
        Math.ceil(1500 / message.byteLength),
      );
      expect((await within(trailers, 10_000, "no answer"))["grpc-status"]).toBe("0");
      expect(Date.now() - started).toBeGreaterThanOrEqual(1000);
    } finally {
      session.destroy();
    }
  });

  it("cancels a call whose client stalls mid-body, then sends GOAWAY to the idle connection", async () => {
    const session = connect();
    session.on("error", () => undefined);
    try {
      const goaway = new Promise<number>((resolve) =>
        session.once("goaway", (code: number) => resolve(code)),
      );
      const stream = session.request({
        ":method": "POST",
        ":path": LOGIN,
        "content-type": "application/grpc",
        te: "trailers",
      });
      stream.on("error", () => undefined);
      const closed = new Promise<number | undefined>((resolve) =>
        stream.once("close", () => resolve(stream.rstCode)),
      );
      // Three bytes of an envelope header, and then nothing: a slow-loris upload.
      stream.write(Buffer.from([0, 0, 0]));
      expect(await within(closed, 5000, "the stalled call was kept")).toBe(http2.constants.NGHTTP2_CANCEL);
      expect(await within(goaway, 5000, "no GOAWAY after the stalled call")).toBe(
        http2.constants.NGHTTP2_NO_ERROR,
      );
    } finally {
      session.destroy();
    }
  });

  it("cancels a call whose client takes none of its answer for an idle period (a zero window), then closes the connection", async () => {
    // A slow reader: its flow-control window never opens, so the answer waits in the server.
    // Counted as a call in progress, it held the connection (and its address's count) until
    // server.maxStreamSeconds, an hour by default.
    const session = http2.connect(ts.server.url, { ca: ts.certs.ca, settings: { initialWindowSize: 0 } });
    session.on("error", () => undefined);
    try {
      const closed = new Promise<void>((resolve) => session.once("close", () => resolve()));
      const stream = session.request({
        ":method": "POST",
        ":path": GET_CURRENT_USER,
        "content-type": "application/json",
      });
      stream.on("error", () => undefined);
      const response = new Promise<http2.IncomingHttpHeaders>((resolve) => stream.once("response", resolve));
      const reset = new Promise<number | undefined>((resolve) =>
        stream.once("close", () => resolve(stream.rstCode)),
      );
      stream.end("{}");
      // The answer's headers arrive (they are not flow-controlled); its body never can.
      expect((await within(response, 5000, "no answer"))[":status"]).toBe(401);
      expect(await within(reset, 5000, "the call whose answer is not read was kept")).toBe(
        http2.constants.NGHTTP2_CANCEL,
      );
      await within(closed, 5000, "the connection was kept after its unread call was cancelled");
    } finally {
      session.destroy();
    }
  });

  it("closes a TCP connection that never starts its TLS handshake after the idle timeout", async () => {
    const socket = net.connect(ts.server.port, "127.0.0.1");
    socket.on("error", () => undefined);
    try {
      const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
      await within(closed, 5000, "a silent TCP connection was kept");
    } finally {
      socket.destroy();
    }
  });

  it("closes an idle HTTP/1.1 keep-alive connection after the timeout", async () => {
    const agent = new https.Agent({ ca: ts.certs.ca, keepAlive: true, maxSockets: 1 });
    try {
      // Resolves (with the socket's own "close" to wait for) once the answer has been read.
      const { socketClosed } = await new Promise<{ socketClosed: Promise<void> }>((resolve, reject) => {
        const req = https.request(`${ts.server.url}/health`, { agent }, (res) => {
          res.resume();
          res.on("end", () =>
            resolve({ socketClosed: new Promise<void>((r) => req.socket!.once("close", () => r())) }),
          );
        });
        req.on("error", reject);
        req.end();
      });
      await within(socketClosed, 5000, "the idle HTTP/1.1 connection was kept");
    } finally {
      agent.destroy();
    }
  });

  it("refuses a gRPC-Web body past maxBodyBytes made of trailer-flagged envelopes, without reading it to its end", async () => {
    const session = connect();
    session.on("error", () => undefined);
    try {
      const login = envelope(
        0,
        toBinary(LoginRequestSchema, create(LoginRequestSchema, { username: "admin", password: "wrong" })),
      );
      // Trailer-flagged envelopes, each far under readMaxBytes: Connect skips them uncounted.
      const filler = envelope(0x80, Buffer.alloc(16 * 1024 - 5, 0x61));
      const result = await within(
        upload(
          session,
          LOGIN,
          { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
          login,
          filler,
          4 * 1024 * 1024,
        ),
        10_000,
        "the server read the body on",
      );
      expect(result.status).toBe(200);
      expect(grpcWebStatus(result.body)).toBe(String(Code.ResourceExhausted));
      expect(result.rstCode).toBe(http2.constants.NGHTTP2_NO_ERROR);
      expect(result.sent).toBeLessThan(4 * 1024 * 1024);
    } finally {
      session.destroy();
    }
  });

  it("refuses a Connect body past maxBodyBytes with ResourceExhausted", async () => {
    const session = connect();
    session.on("error", () => undefined);
    try {
      const result = await within(
        upload(
          session,
          LOGIN,
          { "content-type": "application/json" },
          Buffer.from('{"username":"'),
          Buffer.alloc(16 * 1024, 0x61),
          256 * 1024,
        ),
        10_000,
        "no answer",
      );
      expect(result.status).toBe(429);
      expect(JSON.parse(result.body.toString()).code).toBe("resource_exhausted");
    } finally {
      session.destroy();
    }
  });

  it("resets the stream of a gRPC call refused while the client is still uploading", async () => {
    const session = connect();
    session.on("error", () => undefined);
    try {
      // Refused before the pipeline (no credentials), and far under readMaxBytes when refused.
      const unauthenticated = await within(
        upload(
          session,
          GET_CURRENT_USER,
          { "content-type": "application/grpc", te: "trailers" },
          envelope(0, Buffer.alloc(0)).subarray(0, 3),
          Buffer.alloc(1024, 0),
        ),
        5000,
        "the refused upload's stream was left open",
      );
      expect(unauthenticated.trailers["grpc-status"] ?? unauthenticated.headers["grpc-status"]).toBe(
        String(Code.Unauthenticated),
      );
      expect(unauthenticated.rstCode).toBe(http2.constants.NGHTTP2_NO_ERROR);

      // Refused by the handler before it read anything (an encoding it does not accept).
      const unsupported = await within(
        upload(
          session,
          LOGIN,
          { "content-type": "application/grpc", te: "trailers", "grpc-encoding": "snappy" },
          Buffer.alloc(8, 0),
          Buffer.alloc(1024, 0),
        ),
        5000,
        "the refused upload's stream was left open",
      );
      expect(unsupported.trailers["grpc-status"] ?? unsupported.headers["grpc-status"]).toBe(
        String(Code.Unimplemented),
      );
      expect(unsupported.rstCode).toBe(http2.constants.NGHTTP2_NO_ERROR);

      // The connection is still good for the next call.
      const ok = await within(
        upload(
          session,
          LOGIN,
          { "content-type": "application/grpc", te: "trailers" },
          envelope(
            0,
            toBinary(
              LoginRequestSchema,
              create(LoginRequestSchema, { username: "admin", password: ADMIN_PASSWORD }),
            ),
          ),
          Buffer.alloc(0),
          0,
        ),
        5000,
        "no answer",
      );
      expect(ok.trailers["grpc-status"]).toBe("0");
    } finally {
      session.destroy();
    }
  });

  // Last: the connections it leaves take a moment to close on the server's side.
  it("closes connections beyond the per-IP limit at once, and accepts again when one closes", async () => {
    const open = () => openTls(ts);
    // Earlier tests' connections, closed by their clients, are closed on the server's side a moment later.
    await countDrops(ts, (n) => n === 0);
    const held: tls.TLSSocket[] = [];
    try {
      for (let i = 0; i < 4; i++) {
        const c = await open();
        expect(c.accepted).toBe(true);
        held.push(c.socket);
      }
      const over = await within(open(), 5000, "a connection over the limit was left hanging");
      expect(over.accepted).toBe(false);
      held.shift()!.destroy();
      // The server's side of it closes too; then the address has room again.
      await countDrops(ts, (n) => n < 4);
      const again = await open();
      expect(again.accepted).toBe(true);
      held.push(again.socket);
    } finally {
      for (const s of held) s.destroy();
    }
  });
});

describe.each(DATABASES)("the per-IP connection count on $name", (db) => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(db, {
      server: { idleTimeoutSeconds: 1, requestTimeoutSeconds: 1, maxConnectionsPerIp: 8 },
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  /** A raw TCP connection to the server, once connected. */
  const tcp = () =>
    new Promise<net.Socket>((resolve) => {
      const s = net.connect(ts.server.port, LOOPBACK);
      s.on("error", () => undefined);
      s.once("connect", () => resolve(s));
    });
  const pending = new Set<string>();
  const closeOf = (s: { once(e: "close", l: () => void): unknown }, what = "?") =>
    new Promise<void>((r) => {
      pending.add(what);
      s.once("close", () => {
        pending.delete(what);
        r();
      });
    });

  it("is back at 0 after connections end every way they can, so no address is locked out", async () => {
    const ends: Promise<void>[] = [];
    const mute: tls.TLSSocket[] = [];
    for (let round = 0; round < 3; round++) {
      // Handshake aborted: half a ClientHello, then a FIN, or a reset.
      for (const reset of [false, true]) {
        const s = await tcp();
        ends.push(closeOf(s));
        s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        if (reset) s.resetAndDestroy();
        else s.destroy();
      }
      // Handshake never started: the server's handshake timeout closes it.
      const silent = await tcp();
      ends.push(closeOf(silent, `silent${round}`));
      // Handshake refused by the client (it does not trust the server's certificate).
      const untrusting = tls.connect({ host: LOOPBACK, port: ts.server.port, servername: "localhost" });
      untrusting.on("error", () => undefined);
      ends.push(closeOf(untrusting, `untrusting${round}`));
      // HTTP/2, idle: GOAWAY from the server, then closed.
      const idle = ts.session();
      idle.on("error", () => undefined);
      ends.push(closeOf(idle, `idle${round}`));
      // HTTP/2, closed by the client in the middle of a call.
      const busy = ts.session();
      busy.on("error", () => undefined);
      ends.push(closeOf(busy, `busy${round}`));
      const call = busy.request({ ":method": "POST", ":path": LOGIN, "content-type": "application/grpc" });
      call.on("error", () => undefined);
      call.write(Buffer.from([0, 0, 0]));
      setTimeout(() => busy.destroy(), 50);
      // A TLS connection that never sends the HTTP/2 preface nor reads: its client does
      // not see the close, but the server must close it (counted below) after GOAWAY.
      mute.push((await openTls(ts)).socket);
      // Over the limit (8), while the others are open: refused at once.
      for (const c of await Promise.all(Array.from({ length: 3 }, () => openTls(ts)))) c.socket.resume();
      await within(Promise.all(ends), 10_000, "a connection was not closed by the server").catch((e) => {
        throw new Error(`${e.message}: ${[...pending]}`);
      });
      await countDrops(ts, (n) => n === 0);
    }
    // And the address has its full allowance again.
    const all = await Promise.all(Array.from({ length: 8 }, () => openTls(ts)));
    try {
      expect(all.every((c) => c.accepted)).toBe(true);
    } finally {
      for (const c of all) c.socket.destroy();
      for (const s of mute) s.destroy();
    }
    await countDrops(ts, (n) => n === 0);
  });
});

/** Whether this machine can listen on the IPv6 loopback. */
const IPV6_LOOPBACK = await new Promise<boolean>((resolve) => {
  const probe = net.createServer();
  probe.once("error", () => resolve(false));
  probe.listen(0, "::1", () => probe.close(() => resolve(true)));
});

/** A TLS connection (ALPN h2) to the server over ::1: accepted once the handshake completes, or closed before. */
function openTls6(ts: TestServer): Promise<{ socket: tls.TLSSocket; accepted: boolean }> {
  return new Promise((resolve) => {
    const socket = tls.connect({
      host: "::1",
      port: ts.server.port,
      ca: ts.certs.ca,
      servername: "localhost",
      ALPNProtocols: ["h2"],
    });
    socket.on("error", () => undefined);
    socket.once("secureConnect", () => resolve({ socket, accepted: true }));
    socket.once("close", () => resolve({ socket, accepted: false }));
  });
}

describe("per-address connection and stream limits for IPv6", () => {
  it("key an IPv6 address on its /64 and an IPv4 address, written as IPv6 or not, on itself", () => {
    // Two addresses of one /64 are one client: same key; the next /64 is another.
    expect(budgetKey("2001:db8:1:2::5")).toBe(budgetKey("2001:db8:1:2:ffff:ffff:ffff:9"));
    expect(budgetKey("2001:db8:1:3::5")).not.toBe(budgetKey("2001:db8:1:2::5"));
    // A dual-stack socket's raw peer address: the IPv4 client itself, not one /64 for all of IPv4.
    expect(budgetKey("::ffff:192.0.2.1")).toBe("192.0.2.1");
    expect(budgetKey("::ffff:c000:201")).toBe("192.0.2.1");
    expect(budgetKey("::ffff:192.0.2.1")).not.toBe(budgetKey("::ffff:192.0.2.2"));
  });

  describe.skipIf(!IPV6_LOOPBACK)("over ::1", () => {
    let ts: TestServer;
    beforeAll(async () => {
      ts = await startTestServer(SQLITE, { server: { host: "::1", maxConnectionsPerIp: 2 } });
    });
    afterAll(async () => {
      await ts?.close();
    });

    it("counts an IPv6 peer's connections under its whole /64 and closes those past server.maxConnectionsPerIp", async () => {
      expect(ts.server.url).toBe(`https://[::1]:${ts.server.port}`);
      const held: tls.TLSSocket[] = [];
      try {
        for (let i = 0; i < 2; i++) {
          const c = await openTls6(ts);
          expect(c.accepted).toBe(true);
          held.push(c.socket);
        }
        // Every address of ::1's /64 is the same client: ::2 would be refused like ::1 is.
        expect(ts.server.connectionsFrom("::1")).toBe(2);
        expect(ts.server.connectionsFrom("::2")).toBe(2);
        expect(ts.server.connectionsFrom("0:0:0:0:ffff:ffff:ffff:1")).toBe(2);
        expect(ts.server.connectionsFrom("0:0:0:1::1")).toBe(0);
        const over = await within(openTls6(ts), 5000, "a connection over the limit was left hanging");
        expect(over.accepted).toBe(false);
        held.shift()!.destroy();
        const deadline = Date.now() + 10_000;
        while (ts.server.connectionsFrom("::1") >= 2 && Date.now() < deadline)
          await new Promise((r) => setTimeout(r, 20));
        const again = await openTls6(ts);
        expect(again.accepted).toBe(true);
        held.push(again.socket);
      } finally {
        for (const s of held) s.destroy();
      }
    });
  });
});
