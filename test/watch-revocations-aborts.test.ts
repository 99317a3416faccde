import http2 from "node:http2";
import { setTimeout as sleep } from "node:timers/promises";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { WatchRevocationsRequestSchema } from "../gen/tessera/v1/verification_service_pb.js";
import { RevocationEventRepository } from "../src/storage/repositories/revocation-events.js";
import { SQLITE, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

const PATH = "/tessera.v1.VerificationService/WatchRevocations";

/**
 * Every way a WatchRevocations stream can end without its client's goodbye releases its
 * slot (the per-caller and instance bounds, `tessera_watch_streams_open`) at once: driven
 * over real TLS with raw HTTP/2, so that the reset, the dropped connection and the flow
 * control the server waits on are exactly the client's doing.
 */
describe("WatchRevocations streams ended by the client, the deadline or the server", () => {
  let ts: TestServer;
  let token: string;
  let cursor: string;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, {
      verification: { watchHeartbeatSeconds: 1, watchMaxStreamsPerCaller: 3 },
    });
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    token = (
      await admin.machines.createMachineUser({
        name: `watcher-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    // A cursor to resume from: a stream given it reads the database before its first message.
    const first = await call({});
    cursor = first.cursor;
    first.session.destroy();
  });

  afterAll(async () => {
    await ts?.close();
  });

  /** Open streams on the server, once it settles (within 2 s: a release is immediate, not a poll away). */
  async function openDrops(): Promise<void> {
    await expect.poll(() => ts.app.revocations.stats().open, { timeout: 2_000, interval: 20 }).toBe(0);
  }

  interface Call {
    session: http2.ClientHttp2Session;
    stream: http2.ClientHttp2Stream;
    /** The first message's cursor (when awaited through {@link call}). */
    cursor: string;
  }

  /** Open a WatchRevocations stream (Connect's protocol unless `grpc`) on a connection of its own. */
  function start(opts: { cursor?: string; timeoutMs?: number; window?: number; grpc?: boolean } = {}): {
    session: http2.ClientHttp2Session;
    stream: http2.ClientHttp2Stream;
  } {
    const session = http2.connect(ts.server.url, {
      ca: ts.certs.ca,
      ...(opts.window !== undefined ? { settings: { initialWindowSize: opts.window } } : {}),
    });
    session.on("error", () => undefined);
    const timeout = opts.timeoutMs;
    const stream = session.request({
      ":method": "POST",
      ":path": PATH,
      authorization: `Bearer ${token}`,
      ...(opts.grpc
        ? {
            "content-type": "application/grpc",
            te: "trailers",
            ...(timeout !== undefined ? { "grpc-timeout": `${timeout}m` } : {}),
          }
        : {
            "content-type": "application/connect+proto",
            "connect-protocol-version": "1",
            ...(timeout !== undefined ? { "connect-timeout-ms": String(timeout) } : {}),
          }),
    });
    stream.on("error", () => undefined);
    const body = toBinary(
      WatchRevocationsRequestSchema,
      create(WatchRevocationsRequestSchema, { cursor: opts.cursor ?? "" }),
    );
    const envelope = Buffer.alloc(5 + body.length);
    envelope.writeUInt32BE(body.length, 1);
    Buffer.from(body).copy(envelope, 5);
    stream.end(envelope);
    return { session, stream };
  }

  /** Open a stream and wait for its first message. */
  async function call(opts: { cursor?: string }): Promise<Call> {
    const { session, stream } = start(opts);
    const data = await new Promise<Buffer>((resolve, reject) => {
      stream.once("data", resolve);
      stream.once("close", () => reject(new Error(`stream closed (rst ${stream.rstCode})`)));
    });
    // The message's cursor (field 1, a string), enough to resume from.
    const message = data.subarray(5, 5 + data.readUInt32BE(1));
    const length = message[1]!;
    return { session, stream, cursor: message.subarray(2, 2 + length).toString("utf8") };
  }

  it("releases a stream reset by its client while it waits for the next event or heartbeat", async () => {
    await openDrops();
    const c = await call({});
    expect(ts.app.revocations.stats().open).toBe(1);
    c.stream.close(http2.constants.NGHTTP2_CANCEL);
    await openDrops();
    c.session.destroy();
  });

  it("releases a stream whose connection is dropped while it waits", async () => {
    const c = await call({});
    expect(ts.app.revocations.stats().open).toBe(1);
    c.session.destroy();
    await openDrops();
  });

  it("releases a stream reset while the server waits for the client to read (flow control)", async () => {
    // A window of 0 bytes: the server cannot send its first message, and waits.
    const { session, stream } = start({ window: 0 });
    await expect.poll(() => ts.app.revocations.stats().open, { timeout: 5_000 }).toBe(1);
    await sleep(1_200); // a heartbeat falls due meanwhile: still waiting to write
    stream.close(http2.constants.NGHTTP2_CANCEL);
    await openDrops();
    session.destroy();
  });

  it("releases streams reset at every moment of their start, the database reads of a resume among them", async () => {
    for (let i = 0; i < 30; i++) {
      const { session, stream } = start({ cursor: i % 2 === 0 ? cursor : "" });
      // From before the server has read the request to after its first message.
      await sleep(i % 10);
      stream.close(http2.constants.NGHTTP2_CANCEL);
      if (i % 3 === 0) session.destroy();
      else setTimeout(() => session.destroy(), 50);
    }
    await openDrops();
    // The bound is whole again: three streams of this caller open.
    const three = [await call({}), await call({}), await call({})];
    expect(ts.app.revocations.stats().open).toBe(3);
    for (const c of three) c.session.destroy();
    await openDrops();
  });

  it("releases a stream reset while it reads the database to resume, whose first message then meets a closed stream", async () => {
    // The resume's first read waits (as on a loaded database) until the client has gone.
    const newest = RevocationEventRepository.prototype.newest;
    let reached!: () => void;
    const reading = new Promise<void>((resolve) => {
      reached = resolve;
    });
    let release!: () => void;
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    RevocationEventRepository.prototype.newest = async function (this: RevocationEventRepository) {
      reached();
      await gate;
      return newest.call(this);
    };
    try {
      const { session, stream } = start({ cursor });
      await reading;
      expect(ts.app.revocations.stats().open).toBe(1);
      stream.close(http2.constants.NGHTTP2_CANCEL);
      await new Promise((resolve) => stream.once("close", resolve));
      await sleep(100); // the reset reaches the server
      release();
      await openDrops();
      session.destroy();
    } finally {
      RevocationEventRepository.prototype.newest = newest;
      release();
    }
  });

  it.each([
    ["Connect", false],
    ["gRPC", true],
  ])(
    "ends a %s stream at its deadline with DeadlineExceeded, not OK, and releases it",
    async (_name, grpc) => {
      const { session, stream } = start({ timeoutMs: 1_500, grpc });
      const chunks: Buffer[] = [];
      let trailers: http2.IncomingHttpHeaders = {};
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("trailers", (t) => (trailers = t));
      await expect.poll(() => ts.app.revocations.stats().open, { timeout: 5_000 }).toBe(1);
      await new Promise((resolve) => stream.once("close", resolve));
      await openDrops();
      session.destroy();
      const body = Buffer.concat(chunks);
      if (grpc) {
        expect(trailers["grpc-status"]).toBe(String(Code.DeadlineExceeded));
        return;
      }
      // The Connect protocol's end-stream message (flag 0x02), the last envelope of the body.
      let end: { error?: { code?: string; details?: { debug?: { reason?: string } }[] } } | undefined;
      for (let at = 0; at + 5 <= body.length; at += 5 + body.readUInt32BE(at + 1))
        if (body[at]! & 0x02)
          end = JSON.parse(body.subarray(at + 5, at + 5 + body.readUInt32BE(at + 1)).toString());
      expect(end?.error?.code).toBe("deadline_exceeded");
      // Its reason names the code: INTERNAL is only ever Tessera's own fault.
      expect(end?.error?.details?.[0]?.debug?.reason).toBe("DEADLINE_EXCEEDED");
    },
  );

  it("releases every stream at shutdown, the ones waiting to write among them", async () => {
    const waiting = start({ window: 0 });
    const idle = await call({});
    await expect.poll(() => ts.app.revocations.stats().open, { timeout: 5_000 }).toBe(2);
    await ts.server.close(1_000);
    expect(ts.app.revocations.stats().open).toBe(0);
    waiting.session.destroy();
    idle.session.destroy();
  });
});
