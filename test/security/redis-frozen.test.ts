import { createHash } from "node:crypto";
import { performance } from "node:perf_hooks";
import { createClient } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { budgetKey } from "../../src/client-ip.js";
import { DbProxy } from "../db-proxy.js";
import { rejection } from "../errors-util.js";
import { clientFor, SQLITE, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, basic, clients, short } from "../machine-fixtures.js";
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
/** A username nobody has, of this run: Redis keeps its per-username failure budget for an hour. */
const NOBODY = `nobody-${short()}`;

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
    login.login({ username: NOBODY, password: "wrong guess" }, { timeoutMs: 20_000 }),
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

/** Call the limiters of `server` until they count in Redis again (Redis is tried at most once a second). */
async function untilShared(server = ts): Promise<void> {
  for (let k = 0; !server.app.limits!.shared(); k++) {
    expect(k, "the limiters never went back to Redis").toBeLessThan(100);
    await server.app.limits!.perIp.consume(`probe-${ip()}`);
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

  it("holds the budget the same way when Redis is gone (connections reset) and comes back", async () => {
    await untilShared();
    const from = ip();
    expect(await guesses(from, BUDGET - 1)).toEqual(Array(BUDGET - 1).fill("CREDENTIALS_INVALID"));
    proxy.cut();
    const answers = [await guess(from), await guess(from)];
    expect(answers.map((a) => a.reason)).toEqual(["CREDENTIALS_INVALID", "RATE_LIMITED"]);
    for (const a of answers) expect(a.ms).toBeLessThan(5_000);
    proxy.restore();
    await untilShared();
    expect(await guesses(from, 1)).toEqual(["RATE_LIMITED"]);
    // Two in Redis, two counted in memory (a refused one counts, as in Redis), this one.
    expect(await failures(from)).toBe(BUDGET + 2);
  });

  it("holds HTTP Basic guesses to what is left of the budget spent in Redis before the freeze", async () => {
    await untilShared();
    const from = ip();
    const basicGuesses = async (n: number) => {
      const out: string[] = [];
      for (let i = 0; i < n; i++) {
        const me = createClient(
          UserService,
          withHeaders(ts.connect(), { "x-forwarded-for": from, ...basic(NOBODY, `wrong ${i}`) }),
        );
        out.push((await rejection(me.getCurrentUser({}, { timeoutMs: 20_000 }))).reason ?? "?");
      }
      return out;
    };
    expect(await basicGuesses(BUDGET - 1)).toEqual(Array(BUDGET - 1).fill("CREDENTIALS_INVALID"));
    proxy.freeze();
    expect(await basicGuesses(2)).toEqual(["CREDENTIALS_INVALID", "RATE_LIMITED"]);
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

describe("the request and credential-creation budgets with Redis frozen", () => {
  const PER_IP = 5;
  const CREATIONS = 2;
  const LOCKOUT_AFTER = 2;
  let other: TestServer;
  beforeAll(async () => {
    other = await startTestServer(SQLITE, {
      rateLimit: {
        ...LIMITS_ON,
        perIpPerMinute: PER_IP,
        credentialCreationsPerHour: CREATIONS,
        authFailuresPerUsernamePerIp: LOCKOUT_AFTER,
        lockoutSeconds: 30,
        redisUrl: `redis://127.0.0.1:${proxy.port}/${DB}`,
        redisTimeoutMs: 300,
      },
      server: { trustedProxies: ["127.0.0.1"] },
    });
  });
  afterAll(async () => {
    await other?.close();
  });
  const from = (address: string) => withHeaders(other.connect(), { "x-forwarded-for": address });
  /** `n` authenticated calls from `address`: "ok" or the refusal's reason each. */
  async function calls(token: string, address: string, n: number): Promise<string[]> {
    const out: string[] = [];
    for (let i = 0; i < n; i++)
      try {
        await clientFor(UserService, from(address), token).getCurrentUser({}, { timeoutMs: 20_000 });
        out.push("ok");
      } catch (err) {
        out.push((await rejection(Promise.reject(err))).reason ?? "?");
      }
    return out;
  }

  it("counts an address's requests on from Redis while it is frozen, and adds them to Redis when it answers", async () => {
    await untilShared(other);
    const token = await adminLogin(from(ip()));
    const a = ip();
    expect(await calls(token, a, 3)).toEqual(["ok", "ok", "ok"]);
    proxy.freeze();
    expect(await calls(token, a, 3)).toEqual(["ok", "ok", "RATE_LIMITED"]);
    const b = ip();
    expect(await calls(token, b, 3)).toEqual(["ok", "ok", "ok"]);
    proxy.restore();
    await untilShared(other);
    // Three of five counted in memory, then in Redis with the next call.
    expect(await calls(token, b, 3)).toEqual(["ok", "ok", "RATE_LIMITED"]);
  });

  it("holds a principal to its credential creations across a freeze and the return", async () => {
    await untilShared(other);
    const admin = await adminLogin(from(ip()));
    const username = `frozen-${short()}`;
    await clients(from(ip()), admin).users.createUser({ username, password: "frozen redis password" });
    const token = (
      await createClient(UserService, from(ip())).login({ username, password: "frozen redis password" })
    ).accessToken;
    const create = async () => {
      try {
        await clientFor(TokenService, from(ip()), token).createPersonalAccessToken(
          { name: `pat ${short()}`, scopes: [] },
          { timeoutMs: 20_000 },
        );
        return "ok";
      } catch (err) {
        return (await rejection(Promise.reject(err))).reason ?? "?";
      }
    };
    expect(await create()).toBe("ok");
    proxy.freeze();
    expect([await create(), await create()]).toEqual(["ok", "RATE_LIMITED"]);
    proxy.restore();
    await untilShared(other);
    expect(await create()).toBe("RATE_LIMITED");
  });

  it("keeps a lockout earned while Redis was frozen, and hands it to Redis when it answers", async () => {
    const address = ip();
    const username = `locked-${short()}`;
    const login = createClient(UserService, from(address));
    const attempt = async () =>
      (await rejection(login.login({ username, password: "wrong guess" }, { timeoutMs: 20_000 }))).reason;
    proxy.freeze();
    expect([await attempt(), await attempt(), await attempt()]).toEqual([
      "CREDENTIALS_INVALID",
      "CREDENTIALS_INVALID",
      "RATE_LIMITED",
    ]);
    proxy.restore();
    await untilShared(other);
    expect(await attempt()).toBe("RATE_LIMITED");
    // In Redis now, for the lockout's length: every instance of a fleet refuses the pair.
    const pair = `tessera:authfail-user-ip:${budgetKey(address)}|${createHash("sha256").update(username).digest("base64url")}`;
    const ttl = await redis.pttl(pair);
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(30_000);
  });
});
