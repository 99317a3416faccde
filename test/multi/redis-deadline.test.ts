import { type ChildProcess, spawn } from "node:child_process";
import { createServer } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { createClient } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { ADMIN_PASSWORD, clientFor, SQLITE, startTestServer, type TestServer } from "../helpers.js";

/** A free TCP port on 127.0.0.1. */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address() as { port: number };
  await new Promise((r) => s.close(r));
  return port;
}

/** A throw-away redis-server of this test: no persistence, its own port. */
async function startRedis(port: number): Promise<ChildProcess> {
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    {
      stdio: "ignore",
    },
  );
  const probe = new Redis({ port, host: "127.0.0.1", lazyConnect: true, retryStrategy: () => null });
  probe.on("error", () => undefined);
  for (let i = 0; i < 100; i++) {
    try {
      await probe.connect();
      await probe.ping();
      probe.disconnect();
      return child;
    } catch {
      await sleep(50);
    }
  }
  throw new Error("redis-server did not start");
}

describe("rate limits on a Redis that stops answering", () => {
  let redis: ChildProcess;
  let port: number;
  let ts: TestServer;
  let token: string;
  const warn = vi.fn();
  const info = vi.fn();

  beforeAll(async () => {
    port = await freePort();
    redis = await startRedis(port);
    ts = await startTestServer(SQLITE, {
      rateLimit: { enabled: true, redisUrl: `redis://127.0.0.1:${port}`, redisTimeoutMs: 50 },
    });
    // Only this file's app logs through silentLogger's methods in this worker: count the state lines.
    vi.spyOn(ts.app.logger, "warn").mockImplementation(((msg: unknown) => warn(msg)) as never);
    vi.spyOn(ts.app.logger, "info").mockImplementation(((msg: unknown) => info(msg)) as never);
    token = (
      await createClient(UserService, ts.connect()).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
  });
  afterAll(async () => {
    redis?.kill("SIGKILL");
    await ts?.close();
  });

  const lines = (fn: typeof warn, text: string) => fn.mock.calls.filter(([m]) => m === text).length;

  /** One authenticated call (through every limiter): its duration in ms. */
  async function timedCall(): Promise<number> {
    const started = performance.now();
    const me = await clientFor(UserService, ts.connect(), token).getCurrentUser({}, { timeoutMs: 3000 });
    expect(me.username).toBe("admin");
    return performance.now() - started;
  }

  it("counts in Redis while it answers", async () => {
    const probe = new Redis({ port, host: "127.0.0.1" });
    try {
      // On a loaded machine (CI runs two test files at once) the connection's set-up can
      // outlast the 50 ms deadline, and the limiter then falls back until Redis is tried
      // again (once a second): warm up until calls are counted in Redis, then start the
      // log counts of the tests below from there.
      for (let i = 0; i < 50 && (await probe.keys("tessera:*")).length === 0; i++) {
        await timedCall();
        await sleep(100);
      }
      warn.mockClear();
      info.mockClear();
      await probe.flushall();
      await timedCall();
      expect((await probe.keys("tessera:*")).length).toBeGreaterThan(0);
      expect(lines(warn, "Redis unavailable, limiting per instance")).toBe(0);
    } finally {
      probe.disconnect();
    }
  });

  it("answers authenticated calls at once while Redis is frozen, and logs the change once", async () => {
    redis.kill("SIGSTOP");
    const durations: number[] = [];
    for (let i = 0; i < 8; i++) durations.push(await timedCall());
    // Without a deadline on Redis calls, the first of these waited for ever (20 s and more).
    expect(Math.max(...durations), durations.join(", ")).toBeLessThan(400);
    expect(lines(warn, "Redis unavailable, limiting per instance")).toBe(1);
  });

  it("goes back to Redis once it answers again, and logs that once", async () => {
    redis.kill("SIGCONT");
    // Redis is tried again at most once a second.
    for (let i = 0; i < 60 && lines(info, "Redis back") === 0; i++) {
      await timedCall();
      await sleep(100);
    }
    expect(lines(info, "Redis back")).toBe(1);
    for (let i = 0; i < 5; i++) await timedCall();
    expect(lines(info, "Redis back")).toBe(1);
    expect(lines(warn, "Redis unavailable, limiting per instance")).toBe(1);
  });

  it("answers at once when Redis is killed, and logs the change once more", async () => {
    redis.kill("SIGKILL");
    await new Promise((r) => redis.once("exit", r));
    const durations: number[] = [];
    for (let i = 0; i < 8; i++) durations.push(await timedCall());
    expect(Math.max(...durations), durations.join(", ")).toBeLessThan(400);
    expect(lines(warn, "Redis unavailable, limiting per instance")).toBe(2);
  });
});
