import { connect, createServer, type Server, type Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { createClient } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { budgetKey } from "../../src/client-ip.js";
import { Code, rejection } from "../errors-util.js";
import { SQLITE, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { captureLogs, freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * A fleet's instances starting together behind a load balancer: an instance that answered
 * before its Redis connection was ready counted its first calls (and, RedisState then
 * taking Redis for away, every call of the next second) in memory, each instance granting
 * its own budget of login failures and credential creations. The start now waits for the
 * connection, bounded; a Redis that is down or mute still lets the service start, limited
 * per instance, and says so once.
 */

const UNAVAILABLE = "Redis unavailable, limiting per instance";
const ip = freshIps("100.77");

/** A TCP listener on 127.0.0.1 (port 0: a free one), and what closes it with its connections. */
async function listener(onSocket: (socket: Socket) => void): Promise<{ port: number; close(): void }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => undefined).on("close", () => sockets.delete(socket));
    onSocket(socket);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as { port: number }).port,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/**
 * A proxy to the machine's Redis that holds every connection (unread) until `open()`: a
 * Redis slower to reach than the instance is to start.
 */
async function gatedRedis() {
  let open = false;
  const held: Socket[] = [];
  const upstreams = new Set<Socket>();
  const pipe = (client: Socket) => {
    const upstream = connect(6379, "127.0.0.1");
    upstreams.add(upstream);
    upstream.on("error", () => client.destroy()).on("close", () => client.destroy());
    client.on("close", () => upstream.destroy());
    client.pipe(upstream).pipe(client);
  };
  const server = await listener((socket) => {
    if (open) pipe(socket);
    else {
      socket.pause();
      held.push(socket);
    }
  });
  return {
    url: `redis://127.0.0.1:${server.port}`,
    held: () => held.length,
    open() {
      open = true;
      for (const socket of held.splice(0)) pipe(socket);
    },
    close() {
      for (const u of upstreams) u.destroy();
      server.close();
    },
  };
}

/** A port nothing listens on (taken, then released). */
async function closedPort(): Promise<number> {
  const l = await listener(() => undefined);
  l.close();
  return l.port;
}

async function ready(ts: TestServer): Promise<{ status: number; data?: Record<string, unknown> }> {
  const agent = new Agent({ connect: { ca: ts.certs.ca } });
  try {
    const res = await undiciFetch(`${ts.server.url}/ready`, { dispatcher: agent });
    return { status: res.status, ...((await res.json()) as { data?: Record<string, unknown> }) };
  } finally {
    await agent.close();
  }
}

const lines = (logs: ReturnType<typeof captureLogs>, msg: string) =>
  logs.lines.filter((l) => l.msg === msg).length;

/** Start an instance on `redisUrl` with a logger of its own. */
async function start(redisUrl: string, rateLimit: Record<string, number> = {}) {
  const logs = captureLogs("info");
  const ts = await startTestServer(
    SQLITE,
    {
      rateLimit: { ...LIMITS_ON, redisUrl, ...rateLimit },
      server: { trustedProxies: ["127.0.0.1"] },
    },
    undefined,
    { logger: logs.logger },
  );
  return { ts, logs };
}

describe("an instance whose Redis connects after the instance is built", () => {
  let gate: Awaited<ReturnType<typeof gatedRedis>>;
  let ts: TestServer | undefined;
  const redis = new Redis({ host: "127.0.0.1", port: 6379, lazyConnect: true });
  beforeAll(async () => {
    gate = await gatedRedis();
  });
  afterAll(async () => {
    await ts?.close();
    gate.close();
    redis.disconnect();
  });

  it("counts its first call in Redis, shared, and tells /ready so", async () => {
    const logs = captureLogs("info");
    const starting = startTestServer(
      SQLITE,
      {
        // The bound on the start's wait, max(1000, this), far above the hold below.
        rateLimit: { ...LIMITS_ON, redisUrl: gate.url, redisTimeoutMs: 10_000 },
        server: { trustedProxies: ["127.0.0.1"] },
      },
      undefined,
      { logger: logs.logger },
    );
    await expect.poll(() => gate.held()).toBe(1);
    // Redis is reached a moment after the instance is otherwise built (or at once, if it
    // is still being built): the hold stands for a slower network to Redis, not a bound.
    await Promise.race([starting, sleep(200)]);
    gate.open();
    ts = await starting;
    // The first call after the start, as a load balancer's first request would make it.
    const key = `startup-${ip()}`;
    const first = await ts.app.limits!.perIp.consume(key);
    expect(first.allowed).toBe(true);
    expect(await redis.get(`tessera:ip:${key}`)).toBe("1");
    // A failed Login over the wire: its failure counted in the shared budget.
    const from = ip();
    const login = createClient(UserService, withHeaders(ts.connect(), { "x-forwarded-for": from }));
    expect((await rejection(login.login({ username: "nobody-here", password: "wrong guess" }))).code).toBe(
      Code.Unauthenticated,
    );
    expect(await redis.get(`tessera:authfail:${budgetKey(from)}`)).toBe("1");
    expect(lines(logs, UNAVAILABLE)).toBe(0);
    expect(await ready(ts)).toMatchObject({ status: 200, data: { database: "up", redis: "up" } });
  });
});

describe("an instance whose Redis is away at the start", () => {
  let ts: TestServer | undefined;
  let mute: { port: number; close(): void } | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
    mute?.close();
  });

  /** The start's warning is logged once; limits hold per instance; /ready is 200 and says Redis is down. */
  async function expectStartedPerInstance(started: Awaited<ReturnType<typeof start>>) {
    ts = started.ts;
    // Said at the start, before any call, and only once.
    expect(lines(started.logs, UNAVAILABLE)).toBe(1);
    const login = createClient(UserService, withHeaders(ts.connect(), { "x-forwarded-for": ip() }));
    const reasons: (string | undefined)[] = [];
    for (let i = 0; i < 3; i++)
      reasons.push((await rejection(login.login({ username: "nobody-here", password: "wrong" }))).reason);
    expect(reasons).toEqual(["CREDENTIALS_INVALID", "CREDENTIALS_INVALID", "RATE_LIMITED"]);
    expect(lines(started.logs, UNAVAILABLE)).toBe(1);
    expect(await ready(ts)).toMatchObject({ status: 200, data: { database: "up", redis: "down" } });
  }

  it("starts on a refused connection (a closed port) and limits per instance", async () => {
    await expectStartedPerInstance(
      await start(`redis://127.0.0.1:${await closedPort()}`, { authFailuresPerIpPerMinute: 2 }),
    );
  });

  it("starts past the bound on a Redis that accepts and never answers, and limits per instance", async () => {
    mute = await listener(() => undefined);
    await expectStartedPerInstance(
      await start(`redis://127.0.0.1:${mute.port}`, { authFailuresPerIpPerMinute: 2 }),
    );
  });
});
