import { performance } from "node:perf_hooks";
import { createClient } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { budgetKey } from "../../src/client-ip.js";
import { DbProxy } from "../db-proxy.js";
import { rejection } from "../errors-util.js";
import { SQLITE, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { captureLogs, freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * The failed-password budget while the limiters' Redis is frozen (a proxy of this file
 * holding every byte: a host that stopped answering) and once it answers again. Frozen,
 * every guess is answered within the deadline and counted in memory; the budget an address
 * spent in Redis before the freeze is not granted again in memory, and what it spent in
 * memory during the freeze is not granted again in Redis when it answers. Redis db 13, so
 * no other test's keys are touched (and addresses of this file's own).
 */

const UNAVAILABLE = "Redis unavailable, limiting per instance";
const BUDGET = 3;
const DB = 13;
const ip = freshIps("100.93");

let proxy: DbProxy;
let ts: TestServer;
let logs: ReturnType<typeof captureLogs>;
const redis = new Redis({ host: "127.0.0.1", port: 6379, db: DB, lazyConnect: true });

beforeAll(async () => {
  proxy = await DbProxy.start({ host: "127.0.0.1", port: 6379 });
  logs = captureLogs("info");
  ts = await startTestServer(
    SQLITE,
    {
      rateLimit: {
        ...LIMITS_ON,
        authFailuresPerIpPerMinute: BUDGET,
        redisUrl: `redis://127.0.0.1:${proxy.port}/${DB}`,
        // A loaded machine can hold Redis's answer past 50 ms; what is tested is the budget.
        redisTimeoutMs: 300,
      },
      server: { trustedProxies: ["127.0.0.1"] },
    },
    undefined,
    { logger: logs.logger },
  );
});
afterEach(() => proxy.restore());
afterAll(async () => {
  await ts?.close();
  await proxy?.close();
  redis.disconnect();
});

/** One wrong-password Login from `from`: its reason (and Retry-After when refused), and how long it took. */
async function guess(from: string) {
  const login = createClient(UserService, withHeaders(ts.connect(), { "x-forwarded-for": from }));
  const start = performance.now();
  // The client's deadline only keeps a hung call from holding the test.
  const r = await rejection(
    login.login({ username: "nobody-here", password: "wrong guess" }, { timeoutMs: 20_000 }),
  );
  const ms = performance.now() - start;
  if (r.reason === "RATE_LIMITED") expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(0);
  return { reason: r.reason ?? `code ${r.code}`, ms };
}

async function guesses(from: string, n: number): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < n; i++) out.push((await guess(from)).reason);
  return out;
}

/** Call the limiters until they count in Redis again (Redis is tried at most once a second). */
async function untilShared(): Promise<void> {
  for (let k = 0; !ts.app.limits!.shared(); k++) {
    expect(k, "the limiters never went back to Redis").toBeLessThan(100);
    await ts.app.limits!.perIp.consume(`probe-${ip()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const failures = async (from: string) =>
  Number((await redis.get(`tessera:authfail:${budgetKey(from)}`)) ?? 0);

describe("the failed-password budget with Redis frozen", () => {
  it("answers guesses within the deadline, counted in memory, and logs the change once", async () => {
    await untilShared();
    const mark = logs.lines.length;
    const local = () => ts.app.limits!.countedLocally().authfail ?? 0;
    const before = local();
    proxy.freeze();
    const from = ip();
    const answers = [];
    for (let i = 0; i < BUDGET + 2; i++) answers.push(await guess(from));
    expect(answers.map((a) => a.reason)).toEqual([
      ...Array(BUDGET).fill("CREDENTIALS_INVALID"),
      "RATE_LIMITED",
      "RATE_LIMITED",
    ]);
    // A hang would be the 20 s of the client's deadline; a guess is a deadline (300 ms) and
    // a PBKDF2 at most, however loaded the machine.
    for (const a of answers) expect(a.ms).toBeLessThan(5_000);
    expect(logs.lines.slice(mark).filter((l) => l.msg === UNAVAILABLE)).toHaveLength(1);
    expect(ts.app.limits!.shared()).toBe(false);
    // Every guess counted in memory is counted in tessera_rate_limit_local_total.
    expect(local() - before).toBeGreaterThanOrEqual(BUDGET + 2);
  });

  it("gives concurrent guesses no more than the budget: each is reserved in memory before its hash", async () => {
    proxy.freeze();
    const from = ip();
    const reasons = (await Promise.all(Array.from({ length: 8 }, () => guess(from)))).map((a) => a.reason);
    expect(reasons.filter((r) => r === "CREDENTIALS_INVALID")).toHaveLength(BUDGET);
    expect(reasons.filter((r) => r === "RATE_LIMITED")).toHaveLength(8 - BUDGET);
  });

  it("does not grant again in memory the failures an address spent in Redis before the freeze", async () => {
    await untilShared();
    const from = ip();
    expect(await guesses(from, BUDGET - 1)).toEqual(Array(BUDGET - 1).fill("CREDENTIALS_INVALID"));
    expect(await failures(from)).toBe(BUDGET - 1);
    proxy.freeze();
    // One failure left in the window, not a fresh budget of three.
    expect(await guesses(from, 3)).toEqual(["CREDENTIALS_INVALID", "RATE_LIMITED", "RATE_LIMITED"]);
  });

  it("does not grant again in Redis the failures an address spent in memory while it was frozen", async () => {
    proxy.freeze();
    const from = ip();
    expect(await guesses(from, BUDGET + 1)).toEqual([
      ...Array(BUDGET).fill("CREDENTIALS_INVALID"),
      "RATE_LIMITED",
    ]);
    proxy.restore();
    await untilShared();
    expect(await guesses(from, 2)).toEqual(["RATE_LIMITED", "RATE_LIMITED"]);
    // Counted in Redis, so every instance of a fleet refuses the address too.
    expect(await failures(from)).toBeGreaterThanOrEqual(BUDGET);
  });
});
