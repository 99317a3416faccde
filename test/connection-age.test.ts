import { once } from "node:events";
import type http2 from "node:http2";
import https from "node:https";
import net from "node:net";
import { join } from "node:path";
import tls from "node:tls";
import v8 from "node:v8";
import vm from "node:vm";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport, Http2SessionManager } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { UserAPI } from "../src/sdk/index.js";
import { retryRefusedStream } from "../src/sdk/refused-stream.js";
import { createTesseraAuth } from "../src/sdk/server/index.js";
import { jitteredAge } from "../src/server/connection-age.js";
import type { OpenedCursor } from "../src/verification/revocation-cursor.js";
import { SQLITE, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * server.maxConnectionAgeSeconds: a connection is recycled at its age (GOAWAY, then cut after
 * the grace), so that clients behind an L4 load balancer spread over new instances. Clients
 * calling across several ages must see no failed call, only new connections.
 */
const PROTO_DIR = join(import.meta.dirname, "..", "proto");
const AGED = { server: { maxConnectionAgeSeconds: 1, maxConnectionAgeGraceSeconds: 1 } };
/** The longest duration the configuration takes (setTimeout's longest delay, in whole seconds). */
const LONGEST = 2_147_483;

function grpcHealth(ts: TestServer) {
  const def = protoLoader.loadSync(["grpc/health/v1/health.proto"], { includeDirs: [PROTO_DIR] });
  // biome-ignore lint/suspicious/noExplicitAny: grpc-js package definitions are untyped
  const HealthClient = (grpc.loadPackageDefinition(def) as any).grpc.health.v1
    .Health as grpc.ServiceClientConstructor;
  return new HealthClient(`localhost:${ts.server.port}`, grpc.credentials.createSsl(ts.certs.ca));
}

/** GET /health on a new HTTP/1.1 connection: its status. */
function fetchHealth(ts: TestServer): Promise<number> {
  return new Promise((resolve, reject) => {
    https
      .get(`${ts.server.url}/health`, { ca: ts.certs.ca, agent: false }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      })
      .on("error", reject);
  });
}

/** A raw HTTP/1.1 connection over TLS: its socket, and what it read so far. */
async function http1Socket(ts: TestServer, allowHalfOpen = false) {
  const sock = tls.connect({
    // Passed on to the socket by tls.connect, though not in its types.
    ...({ allowHalfOpen } as tls.ConnectionOptions),
    port: ts.server.port,
    host: "127.0.0.1",
    servername: "localhost",
    ca: ts.certs.ca,
    ALPNProtocols: ["http/1.1"],
  });
  sock.on("error", () => undefined);
  let got = "";
  sock.on("data", (d: Buffer) => {
    got += d.toString("latin1");
  });
  // When it closed (listened to from the start: a loaded machine may get there before the test).
  const closed = once(sock, "close").then(() => Date.now());
  await once(sock, "secureConnect");
  return { sock, got: () => got, closed };
}

/** Health/Watch over Connect on HTTP/1.1 (a server stream: it stays open until cancelled). */
function watchRequest(): Buffer {
  const body = Buffer.concat([Buffer.from([0, 0, 0, 0, 2]), Buffer.from("{}")]);
  return Buffer.concat([
    Buffer.from(
      "POST /grpc.health.v1.Health/Watch HTTP/1.1\r\nHost: localhost\r\n" +
        `Content-Type: application/connect+json\r\nContent-Length: ${body.length}\r\n\r\n`,
    ),
    body,
  ]);
}

/** Sessions the server accepted from now on. */
function countSessions(ts: TestServer): { readonly n: number } {
  const counter = { n: 0 };
  ts.server.server.on("session", () => counter.n++);
  return counter;
}

/** `tessera_connections_recycled_total` by protocol, as scraped. */
async function recycled(ts: TestServer): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const line of (await ts.app.metrics!.scrape()).split("\n")) {
    const m = /^tessera_connections_recycled_total\{protocol="(\w+)"\} (\d+)/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

/**
 * Run `call` in `loops` concurrent loops (5 ms apart) until `done()` (a condition, not a fixed
 * time: a loaded machine fires the ages late), at most 30 s; the calls made and the failures.
 */
async function callUntil(done: () => boolean, loops: number, call: () => Promise<unknown>) {
  const end = Date.now() + 30_000;
  let calls = 0;
  const failures: unknown[] = [];
  await Promise.all(
    Array.from({ length: loops }, async () => {
      while (!done() && Date.now() < end) {
        try {
          await call();
        } catch (err) {
          failures.push(err);
        }
        calls++;
        await new Promise((r) => setTimeout(r, 5));
      }
    }),
  );
  return { calls, failures };
}

describe("connections recycled at server.maxConnectionAgeSeconds", () => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  it("keeps a grpc-js client's calls succeeding across several ages, on new connections, and counts them", async () => {
    ts = await startTestServer(SQLITE, AGED);
    const sessions = countSessions(ts);
    const before = (await recycled(ts)).http2 ?? 0;
    const client = grpcHealth(ts);
    try {
      // About one connection per second (± 10 %): until three ages passed.
      const { calls, failures } = await callUntil(
        () => sessions.n >= 4,
        4,
        () =>
          new Promise((resolve, reject) =>
            // biome-ignore lint/suspicious/noExplicitAny: dynamic client
            (client as any).Check({ service: "" }, (err: grpc.ServiceError | null, res: unknown) =>
              err ? reject(err) : resolve(res),
            ),
          ),
      );
      expect(failures).toEqual([]);
      expect(calls).toBeGreaterThan(20);
      expect(sessions.n).toBeGreaterThanOrEqual(4);
      expect((await recycled(ts)).http2! - before).toBeGreaterThanOrEqual(3);
    } finally {
      client.close();
    }
  });

  it("keeps a Connect client's calls (HTTP/2) succeeding across several ages, on new connections", async () => {
    ts = await startTestServer(SQLITE, AGED);
    const sessions = countSessions(ts);
    // connect-node does not retry a refused stream by itself (grpc-js does): a call it opened
    // as the GOAWAY arrived. The SDK's clients retry it once (RFC 9113 8.7), so does this one.
    const transport = createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca },
      interceptors: [retryRefusedStream],
    });
    const client = createClient(Health, transport);
    const { calls, failures } = await callUntil(
      () => sessions.n >= 4,
      4,
      () => client.check({ service: "" }),
    );
    expect(failures).toEqual([]);
    expect(calls).toBeGreaterThan(20);
    expect(sessions.n).toBeGreaterThanOrEqual(4);
  });

  it("never sends a stock connect-node client GOAWAY while it has no call open (it would die of an uncaught error)", async () => {
    ts = await startTestServer(SQLITE, AGED);
    const before = (await recycled(ts)).http2 ?? 0;
    // connect-node 2.1.2, stock: a GOAWAY read with no stream open makes it destroy the
    // session with an error Node emits once the socket has closed; a request made meanwhile
    // takes the session's "error" listener off, and the error is thrown uncaught in the
    // client (bench/goaway-idle-repro.ts). Such an error is recorded here, and swallowed.
    const unheard: unknown[] = [];
    const goaways: string[] = [];
    const seen = new WeakSet<http2.ClientHttp2Session>();
    const sessions: http2.ClientHttp2Session[] = [];
    let next: (() => void) | undefined;
    class Watched extends Http2SessionManager {
      override async request(...args: Parameters<Http2SessionManager["request"]>) {
        const stream = await super.request(...args);
        const session = stream.session as http2.ClientHttp2Session;
        if (!seen.has(session)) {
          seen.add(session);
          sessions.push(session);
          const emit = session.emit.bind(session);
          session.emit = ((event: string, ...rest: unknown[]) => {
            if (event === "error" && session.listenerCount("error") === 0) {
              unheard.push(rest[0]);
              return false;
            }
            return emit(event, ...rest);
          }) as typeof session.emit;
          // After connect-node's own listener: the client's next call, as the GOAWAY is read.
          session.on("goaway", () => {
            // connect-node destroys at once a session that had no stream open.
            goaways.push(session.destroyed ? "destroyed: no stream open" : "kept: a stream open");
            setImmediate(() => next?.());
          });
        }
        return stream;
      }
    }
    const manager = new Watched(ts.server.url, {}, { ca: ts.certs.ca });
    const client = createClient(
      Health,
      createConnectTransport({ baseUrl: ts.server.url, httpVersion: "2", sessionManager: manager }),
    );
    const calls: Promise<unknown>[] = [];
    next = () => calls.push(client.check({ service: "" }));
    try {
      await client.check({ service: "" });
      // Idle across the age (1 s ± 10 %), then calls one at a time, idle between them, until a
      // GOAWAY came (a loaded machine may fire the age late).
      await new Promise((resolve) => setTimeout(resolve, 2500));
      for (const end = Date.now() + 20_000; goaways.length === 0 && Date.now() < end; ) {
        calls.push(client.check({ service: "" }));
        await Promise.all(calls);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      expect(goaways.length).toBeGreaterThanOrEqual(1);
      // Every session but the newest is done with (its error, if any, emitted), every call answered.
      await expect
        .poll(() => sessions.length >= 2 && sessions.slice(0, -1).every((s) => s.destroyed), {
          timeout: 5000,
        })
        .toBe(true);
      await new Promise((resolve) => setTimeout(resolve, 50));
      await Promise.all(calls);
      expect(unheard).toEqual([]);
      // Recycled at that call, not while idle.
      expect(goaways[0]).toBe("kept: a stream open");
      expect((await recycled(ts)).http2! - before).toBeGreaterThanOrEqual(1);
    } finally {
      next = undefined;
      manager.abort();
    }
  });

  it("keeps an SDK client's process alive when a GOAWAY reaches its idle connection (the idle timeout's)", async () => {
    // Any server may GOAWAY an idle connection (Tessera's own idle timeout does): the SDK's
    // sessions keep an "error" listener, so connect-node's error for it is never thrown.
    ts = await startTestServer(SQLITE, { server: { idleTimeoutSeconds: 1 } });
    const api = new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir });
    const unheard: unknown[] = [];
    const sessions: http2.ClientHttp2Session[] = [];
    const calls: Promise<boolean>[] = [];
    const request = Http2SessionManager.prototype.request;
    const spy = vi.spyOn(Http2SessionManager.prototype, "request").mockImplementation(async function (
      this: Http2SessionManager,
      ...args
    ) {
      const stream = await request.apply(this, args);
      const session = stream.session as http2.ClientHttp2Session;
      if (!sessions.includes(session)) {
        sessions.push(session);
        const emit = session.emit.bind(session);
        session.emit = ((event: string, ...rest: unknown[]) => {
          if (event === "error" && session.listenerCount("error") === 0) {
            unheard.push(rest[0]);
            return false;
          }
          return emit(event, ...rest);
        }) as typeof session.emit;
        // The application's next call, as the GOAWAY is read (the server closing the
        // connection too, the error follows within a millisecond).
        session.once("goaway", () => calls.push(api.isAvailable()));
      }
      return stream;
    });
    try {
      expect(await api.isAvailable()).toBe(true);
      await expect.poll(() => calls.length, { timeout: 5000 }).toBe(1);
      expect(await Promise.all(calls)).toEqual([true]);
      await expect.poll(() => sessions[0]!.destroyed, { timeout: 5000 }).toBe(true);
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(unheard).toEqual([]);
    } finally {
      spy.mockRestore();
      api.close();
    }
  });

  it("ends a streaming call still open at the age once the grace is over, and no sooner", async () => {
    ts = await startTestServer(SQLITE, {
      server: { maxConnectionAgeSeconds: 1, maxConnectionAgeGraceSeconds: 2 },
    });
    const session: http2.ClientHttp2Session = ts.session();
    session.on("error", () => undefined);
    const started = Date.now();
    let goaway = 0;
    session.once("goaway", () => {
      goaway = Date.now() - started;
    });
    // Health/Watch over Connect (a server stream): it stays open until cancelled.
    const stream = session.request({
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Watch",
      "content-type": "application/connect+json",
    });
    stream.on("error", () => undefined);
    const body = Buffer.from("{}");
    const head = Buffer.alloc(5);
    head.writeUInt32BE(body.length, 1);
    stream.end(Buffer.concat([head, body]));
    let data = 0;
    stream.on("data", (c: Buffer) => {
      data += c.length;
    });
    // Bounded: without an age the stream stays open for ever.
    const ended = await new Promise<number>((resolve) => {
      stream.once("close", () => resolve(Date.now() - started));
      setTimeout(() => resolve(Number.POSITIVE_INFINITY), 8000).unref();
    });
    session.destroy();
    // The status was sent (SERVING), then the stream stayed open through the GOAWAY.
    expect(data).toBeGreaterThan(0);
    // At the age (1 s - 10 %; a timer may fire a millisecond early), late only by the load.
    expect(goaway).toBeGreaterThanOrEqual(890);
    expect(goaway).toBeLessThan(1100 + 3000);
    expect(ended).toBeGreaterThanOrEqual(goaway + 2000 - 50);
    // The grace runs from the second GOAWAY, up to a second (PING_WAIT_MS) after the first.
    expect(ended).toBeLessThan(goaway + 2000 + 1000 + 3000);
  });

  it("leaves the SDK's VerifyCredential calls succeeding, and its revocation watch resuming from its cursor", async () => {
    ts = await startTestServer(SQLITE, { ...AGED, verification: { watchHeartbeatSeconds: 1 } });
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    const tenantId = (await admin.tenants.createTenant({ name: `age-${short()}` })).tenant!.id;
    const machine = (scopes: string[]) =>
      admin.machines
        .createMachineUser({ tenantId, name: `mu-${short()}`, authType: MachineAuthType.BEARER, scopes })
        .then((r) => r.token);
    const verifier = await machine(["auth:verify"]);
    const caller = await machine(["workflows:read"]);
    const resumed: (OpenedCursor | undefined)[] = [];
    const codec = ts.app.revocations.cursors;
    const open = codec.open.bind(codec);
    vi.spyOn(codec, "open").mockImplementation((cursor) => {
      const at = open(cursor);
      resumed.push(at);
      return at;
    });
    const sessions = countSessions(ts);
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      cache: false,
    });
    try {
      expect(await auth.ready(10_000)).toBe(true);
      // Until the watch's stream came back after a cut (age + grace), on a third connection.
      const { calls, failures } = await callUntil(
        () => sessions.n >= 3 && auth.stats().watch!.connects >= 2 && resumed.length >= 1,
        3,
        () => auth.authenticate(`Bearer ${caller}`),
      );
      expect(failures).toEqual([]);
      expect(calls).toBeGreaterThan(10);
      expect(sessions.n).toBeGreaterThanOrEqual(3);
      // The watch's stream was cut at age + grace, and came back resuming from its cursor
      // (never a reset: no event was lost).
      const watch = auth.stats().watch!;
      expect(watch.connects).toBeGreaterThanOrEqual(2);
      expect(watch.resets).toBe(0);
      expect(resumed.length).toBeGreaterThanOrEqual(1);
      expect(resumed.every((at) => at !== undefined)).toBe(true);
      await expect.poll(() => auth.watching()).toBe(true);
    } finally {
      auth.close();
    }
  });

  it("keeps a connection whose age is the longest allowed (24.8 days) open, not recycled at once", async () => {
    // The configuration caps it at setTimeout's longest delay; its +10 % jitter goes past it,
    // and setTimeout takes a delay past 2^31-1 ms as 1 ms.
    ts = await startTestServer(SQLITE, {
      server: { maxConnectionAgeSeconds: LONGEST, maxConnectionAgeGraceSeconds: LONGEST },
    });
    const before = await recycled(ts);
    // The top of the jitter (+9.8 %), for this connection's age.
    const random = vi.spyOn(Math, "random").mockReturnValue(0.99);
    const session: http2.ClientHttp2Session = ts.session();
    session.on("error", () => undefined);
    let goaway = false;
    session.on("goaway", () => {
      goaway = true;
    });
    await new Promise((resolve) => session.once("connect", resolve));
    await new Promise((resolve) => setTimeout(resolve, 300));
    // A call, after which a GOAWAY owed by an aged idle session would have been sent.
    const check = session.request({
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Check",
      "content-type": "application/json",
    });
    check.on("error", () => undefined);
    check.end("{}");
    check.resume();
    await new Promise((resolve) => check.once("close", resolve));
    // Answered: the server has long made the session (and drawn its jitter).
    random.mockRestore();
    await new Promise((resolve) => setTimeout(resolve, 100));
    const closed = session.closed || session.destroyed;
    session.destroy();
    expect({ goaway, closed, recycled: await recycled(ts) }).toEqual({
      goaway: false,
      closed: false,
      recycled: before,
    });
  });

  it("keeps a streaming call open through the longest grace allowed (24.8 days), not cut at once", async () => {
    ts = await startTestServer(SQLITE, {
      server: { maxConnectionAgeSeconds: 1, maxConnectionAgeGraceSeconds: LONGEST },
    });
    const session: http2.ClientHttp2Session = ts.session();
    session.on("error", () => undefined);
    let goaways = 0;
    session.on("goaway", () => {
      goaways++;
    });
    const stream = session.request({
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Watch",
      "content-type": "application/connect+json",
    });
    stream.on("error", () => undefined);
    const body = Buffer.from("{}");
    const head = Buffer.alloc(5);
    head.writeUInt32BE(body.length, 1);
    stream.end(Buffer.concat([head, body]));
    stream.resume();
    // Both GOAWAYs (the second after two PING round trips), then a moment for a cut to come.
    await expect.poll(() => goaways, { timeout: 10_000 }).toBe(2);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const open = !stream.closed && !stream.destroyed;
    session.destroy();
    expect({ goaways, open }).toEqual({ goaways: 2, open: true });
  });

  it("closes an HTTP/1.1 keep-alive connection at its age: idle at once, busy after its response", async () => {
    ts = await startTestServer(SQLITE, AGED);
    const agent = new https.Agent({ keepAlive: true, ca: ts.certs.ca, maxSockets: 1 });
    const get = () =>
      new Promise<{ status: number; connection: string | undefined; socket: object }>((resolve, reject) => {
        const req = https.get(`${ts!.server.url}/health`, { agent }, (res) => {
          res.resume();
          res.on("end", () =>
            resolve({ status: res.statusCode ?? 0, connection: res.headers.connection, socket: req.socket! }),
          );
        });
        req.on("error", reject);
      });
    try {
      const before = (await recycled(ts)).http1 ?? 0;
      const first = await get();
      expect(first.status).toBe(200);
      let closed = false;
      (first.socket as import("node:net").Socket).once("close", () => {
        closed = true;
      });
      await expect.poll(() => closed, { timeout: 10_000 }).toBe(true);
      expect((await recycled(ts)).http1! - before).toBe(1);
      // The next request opens a new connection, and succeeds.
      const second = await get();
      expect(second.status).toBe(200);
      expect(second.socket).not.toBe(first.socket);
    } finally {
      agent.destroy();
    }
  });
  it("keeps no finished call alive on a connection it will recycle", async () => {
    // Up to 63 finished streams (~3.4 KB each) per connection stayed in a Set until it was
    // pruned: hundreds of MB over thousands of connections. The age now reads the session's
    // open streams from stream-bounds.ts, whose links are cleared when a stream closes.
    ts = await startTestServer(SQLITE, { server: { maxConnectionAgeSeconds: 3600, idleTimeoutSeconds: 0 } });
    v8.setFlagsFromString("--expose-gc");
    const gc = vm.runInNewContext("gc") as () => void;
    const finished: WeakRef<http2.ServerHttp2Stream>[] = [];
    let closed = 0;
    ts.server.server.on("stream", (stream: http2.ServerHttp2Stream) => {
      finished.push(new WeakRef(stream));
      stream.once("close", () => closed++);
    });
    const sessions = new Http2SessionManager(ts.server.url, {}, { ca: ts.certs.ca });
    const client = createClient(
      Health,
      createConnectTransport({ baseUrl: ts.server.url, httpVersion: "2", sessionManager: sessions }),
    );
    try {
      for (let i = 0; i < 3; i++) await client.check({});
      await expect.poll(() => closed).toBe(3);
      // The connection is still open, and the age has not come.
      expect(sessions.state()).not.toBe("closed");
      await expect
        .poll(
          async () => {
            await new Promise((resolve) => setImmediate(resolve));
            gc();
            return finished.filter((ref) => ref.deref() !== undefined).length;
          },
          { timeout: 10_000 },
        )
        .toBe(0);
    } finally {
      sessions.abort();
    }
  });

  it("ends an HTTP/1.1 streaming answer still open at the age once the grace is over, and no sooner", async () => {
    // maxConnectionAgeGraceSeconds applied to HTTP/2 only: an HTTP/1.1 connection carrying a
    // server stream (Health/Watch over Connect) was never recycled.
    ts = await startTestServer(SQLITE, {
      server: { maxConnectionAgeSeconds: 1, maxConnectionAgeGraceSeconds: 2 },
    });
    const before = (await recycled(ts)).http1 ?? 0;
    // Before the connection: the server's age counts from its handshake, no sooner.
    const opened = Date.now();
    const h1 = await http1Socket(ts);
    try {
      h1.sock.write(watchRequest());
      await expect.poll(() => h1.got().includes("SERVING"), { timeout: 10_000 }).toBe(true);
      await expect.poll(async () => (await recycled(ts!)).http1 ?? 0, { timeout: 10_000 }).toBe(before + 1);
      const aged = Date.now() - opened;
      // Bounded: without the grace the answer stays open for ever.
      const ended = await new Promise<number>((resolve) => {
        h1.closed.then((at) => resolve(at - opened));
        setTimeout(() => resolve(Number.POSITIVE_INFINITY), 10_000).unref();
      });
      // The grace runs from the age (which the poll saw at most its interval late).
      expect(ended).toBeGreaterThanOrEqual(900 + 2000 - 50);
      expect(ended).toBeLessThan(aged + 2000 + 3000);
    } finally {
      h1.sock.destroy();
    }
  });

  it("cuts an idle aged HTTP/1.1 connection after the grace when its client ignores the end", async () => {
    // The idle branch ended the socket with no cut: a client that never ends its side kept it
    // half-open until the idle timeout (off here), for ever.
    ts = await startTestServer(SQLITE, {
      // A request timeout of 60 s: Node's headers timeout (bounded by it) would close it otherwise.
      server: {
        maxConnectionAgeSeconds: 1,
        maxConnectionAgeGraceSeconds: 1,
        idleTimeoutSeconds: 0,
        requestTimeoutSeconds: 60,
      },
    });
    const server = ts.server.server as unknown as {
      getConnections(cb: (err: Error | null, n: number) => void): void;
    };
    const connections = () =>
      new Promise<number>((resolve, reject) =>
        server.getConnections((err, n) => (err ? reject(err) : resolve(n))),
      );
    const before = await connections();
    const h1 = await http1Socket(ts, true);
    try {
      await expect.poll(connections, { timeout: 5_000 }).toBe(before + 1);
      // The server's side is gone (not half-open) once the age and the grace are over.
      await expect.poll(connections, { timeout: 12_000, interval: 200 }).toBe(before);
    } finally {
      h1.sock.destroy();
    }
  });

  it("does not process a request pipelined behind the last answer of an aged HTTP/1.1 connection", async () => {
    // The answer in progress at the age says "Connection: close", and Node ends the connection
    // after it; a request pipelined behind it was still handed to the handler, its answer never
    // sent: a client retrying it, as it may (RFC 9112 9.3.2), ran it twice. RFC 9112 9.6: not
    // processed at all, and the client sees the close without an answer. A long grace: the
    // connection ends with that answer, not cut before it.
    ts = await startTestServer(SQLITE, {
      server: { maxConnectionAgeSeconds: 1, maxConnectionAgeGraceSeconds: 30 },
    });
    const before = (await recycled(ts)).http1 ?? 0;
    const processed: string[] = [];
    ts.server.server.on("request", (req: http2.Http2ServerRequest) => {
      if (req.httpVersion === "1.1") processed.push(req.url);
    });
    const h1 = await http1Socket(ts);
    try {
      // A unary call whose body is held: in progress, its answer not begun, across the age.
      const body = Buffer.from("{}");
      h1.sock.write(
        "POST /grpc.health.v1.Health/Check HTTP/1.1\r\nHost: localhost\r\n" +
          `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`,
      );
      await expect.poll(() => processed.length, { timeout: 10_000 }).toBe(1);
      await expect.poll(async () => (await recycled(ts!)).http1 ?? 0, { timeout: 10_000 }).toBe(before + 1);
      // Its body, and a second request pipelined behind it, in one write.
      h1.sock.write(Buffer.concat([body, Buffer.from("GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")]));
      await h1.closed;
      const answers = h1.got().match(/^HTTP\/1\.1 \d+/gm) ?? [];
      expect({
        answers,
        close: /\r\nconnection: close\r\n/i.test(h1.got()),
        serving: h1.got().includes("SERVING"),
        processed,
      }).toEqual({
        answers: ["HTTP/1.1 200"],
        close: true,
        serving: true,
        processed: ["/grpc.health.v1.Health/Check"],
      });
    } finally {
      h1.sock.destroy();
    }
  });

  it("survives a request on an aged HTTP/1.1 connection that the handler would answer at once, and does not process it", async () => {
    // Aged while a streaming answer is under way (its headers sent), the connection ends after
    // the grace; a request pipelined behind it was answered by the handler synchronously
    // (/health), and the age's "Connection: close" set after that threw out of the "request"
    // event. It is now not processed at all (its answer could never be sent). The grace long
    // enough for the pipelined request to reach the connection before the cut.
    ts = await startTestServer(SQLITE, {
      server: { maxConnectionAgeSeconds: 1, maxConnectionAgeGraceSeconds: 3 },
    });
    const before = (await recycled(ts)).http1 ?? 0;
    // The pipelined request's "request" event, seen by a listener that runs after the age's.
    let pipelined = false;
    ts.server.server.on("request", (req: http2.Http2ServerRequest) => {
      if (req.httpVersion === "1.1" && req.url === "/health") pipelined = true;
    });
    const thrown: unknown[] = [];
    const onUncaught = (err: unknown) => thrown.push(err);
    process.on("uncaughtException", onUncaught);
    const h1 = await http1Socket(ts);
    try {
      h1.sock.write(watchRequest());
      await expect.poll(() => h1.got().includes("SERVING"), { timeout: 10_000 }).toBe(true);
      await expect.poll(async () => (await recycled(ts!)).http1 ?? 0, { timeout: 10_000 }).toBe(before + 1);
      expect(h1.sock.destroyed).toBe(false);
      h1.sock.write("GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
      await h1.closed;
      const processed = pipelined;
      // The server still answers (a new connection's /health).
      const res = await fetchHealth(ts);
      expect({ thrown: thrown.map(String), pipelined: processed, status: res }).toEqual({
        thrown: [],
        pipelined: false,
        status: 200,
      });
    } finally {
      process.off("uncaughtException", onUncaught);
      h1.sock.destroy();
    }
  });
});

describe("connection age on the plaintext development server", () => {
  it("has no HTTP/1.1 connection to age: Node's h2c server answers HTTP/1.1 with HTTP/2", async () => {
    // connection-age.ts ages HTTP/1.1 over TLS only. Should Node ever serve HTTP/1.1 on its
    // plaintext server (allowHTTP1), this fails: age those connections from "connection" then.
    const ts = await startTestServer(SQLITE, { server: { insecurePlaintext: true, ...AGED.server } });
    const sock = net.connect({ port: ts.server.port, host: "127.0.0.1" });
    try {
      sock.on("error", () => undefined);
      let got = Buffer.alloc(0);
      sock.on("data", (d: Buffer) => {
        got = Buffer.concat([got, d]);
      });
      await once(sock, "connect");
      sock.write("GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
      await once(sock, "close");
      // An HTTP/2 SETTINGS frame (type 4 at byte 3), never an HTTP/1.1 status line.
      expect({ http1: got.toString("latin1").startsWith("HTTP/1"), frame: got[3] }).toEqual({
        http1: false,
        frame: 4,
      });
    } finally {
      sock.destroy();
      await ts.close();
    }
  });
});

describe("jitteredAge", () => {
  it("spreads an age over ± 10 %", () => {
    expect(jitteredAge(1000, () => 0)).toBe(900);
    expect(jitteredAge(1000, () => 0.5)).toBe(1000);
    expect(jitteredAge(1000, () => 0.999_999)).toBe(1100);
  });
});
