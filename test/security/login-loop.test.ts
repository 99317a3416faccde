import { randomUUID } from "node:crypto";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { loadConfig } from "../../src/config.js";
import type { TesseraError } from "../../src/errors.js";
import { createRateLimits } from "../../src/rate-limit.js";
import { Code, rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { clients, short } from "../machine-fixtures.js";
import { captureLogs, freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * The holder of one account looping its own right password. Every Login is a full PBKDF2
 * (human passwords are not cached at Login) and every failure budget gives its point back
 * when the password is right: with no budget of checks per username, one account could keep
 * the shared hash pool full, and every other user's Login was refused Unavailable.
 */
const CHECKS = 3;
/** The hash pool: one slot, eight waiting, no deadline (nothing here depends on time). */
const QUEUE = 8;
/** Concurrent logins of the looping account: more than the pool and its queue hold. */
const LOOP = 30;
const PASSWORD = "my own right password";

/** A client address no other test uses (Redis keeps its counts across runs). */
const freshIp = freshIps("192.88");

type Outcome = { reason: string; retryAfter: number };

/** How a call ended: ACCEPTED, or its reason with its Retry-After. */
async function outcome(call: Promise<unknown>): Promise<Outcome> {
  try {
    await call;
    return { reason: "ACCEPTED", retryAfter: 0 };
  } catch {
    const r = await rejection(call);
    return { reason: r.reason ?? String(r.code), retryAfter: Number(r.error.metadata.get("retry-after")) };
  }
}

const count = (outcomes: Outcome[], reason: string) => outcomes.filter((o) => o.reason === reason).length;

describe.each(DATABASES)("an account looping its right password on $name", (db) => {
  describe.each([
    { limiter: "memory", redisUrl: undefined },
    { limiter: "redis", redisUrl: "redis://127.0.0.1:6379" },
  ])("with the $limiter limiter", ({ redisUrl }) => {
    let ts: TestServer;
    let transport: Transport;
    let adminToken: string;
    const from = (ip: string) => withHeaders(transport, { "x-forwarded-for": ip });

    beforeAll(async () => {
      // An admin of its own name: Redis keeps every username's budget, and other files log in "admin".
      const admin = `admin-${short()}`;
      const logs = captureLogs("info");
      ts = await startTestServer(
        db,
        {
          admin: { username: admin },
          rateLimit: {
            ...LIMITS_ON,
            passwordChecksPerUsernamePerMinute: CHECKS,
            ...(redisUrl ? { redisUrl, redisTimeoutMs: 10_000 } : {}),
          },
          server: { trustedProxies: ["127.0.0.1"] },
          auth: { passwordIterations: 20_000, hashConcurrency: 1, hashQueue: QUEUE, hashDeadlineMs: 0 },
        },
        undefined,
        { logger: logs.logger },
      );
      transport = ts.connect();
      adminToken = (
        await createClient(UserService, from(freshIp())).login({ username: admin, password: ADMIN_PASSWORD })
      ).accessToken;
      // The start waited for Redis: its first calls were counted there, not per instance.
      expect(logs.lines.filter((l) => l.msg === "Redis unavailable, limiting per instance")).toEqual([]);
    });
    afterAll(async () => {
      await ts.close();
    });

    async function newUser(): Promise<string> {
      // Its own name each run: Redis keeps the budget of a username across runs.
      const username = `looper-${randomUUID().slice(0, 8)}`;
      await clients(transport, adminToken).users.createUser({ username, password: PASSWORD, scopes: [] });
      return username;
    }

    it("keeps another user's Login answered while one account floods the hash pool with its right password", async () => {
      const looper = await newUser();
      const victim = await newUser();
      // The one slot held by a hash that does not end until released: the pool's state is
      // then decided by the calls alone, not by how fast this machine hashes.
      let release!: () => void;
      const held = hashPool().run(() => new Promise<void>((resolve) => (release = resolve)));
      const settled: Outcome[] = [];
      const loop = Array.from({ length: LOOP }, (_, i) =>
        outcome(
          createClient(UserService, from(freshIp())).login({ username: looper, password: PASSWORD }),
        ).then(
          (o) => {
            settled.push(o);
            return o;
          },
          () => ({ reason: `unexpected ${i}`, retryAfter: 0 }),
        ),
      );
      // Every looping call is either answered or waiting in the pool's queue.
      await expect.poll(() => settled.length + hashPool().stats().queued).toBe(LOOP);
      expect(hashPool().stats().queued).toBe(CHECKS);
      const mine = outcome(
        createClient(UserService, from(freshIp())).login({ username: victim, password: PASSWORD }),
      );
      await expect.poll(() => hashPool().stats().queued).toBe(CHECKS + 1);
      release();
      await held;
      expect(await mine).toEqual({ reason: "ACCEPTED", retryAfter: 0 });
      const looped = await Promise.all(loop);
      expect(count(looped, "ACCEPTED")).toBe(CHECKS);
      expect(count(looped, "RATE_LIMITED")).toBe(LOOP - CHECKS);
      for (const o of looped.filter((l) => l.reason === "RATE_LIMITED")) {
        expect(o.retryAfter).toBeGreaterThan(0);
        expect(o.retryAfter).toBeLessThanOrEqual(60);
      }
    });

    it("lets exactly the budget of 30 concurrent right logins reach PBKDF2", async () => {
      const username = await newUser();
      const ip = freshIp();
      const before = hashPool().stats().started;
      const outcomes = await Promise.all(
        Array.from({ length: LOOP }, () =>
          outcome(createClient(UserService, from(ip)).login({ username, password: PASSWORD })),
        ),
      );
      expect(hashPool().stats().started - before).toBe(CHECKS);
      expect(count(outcomes, "ACCEPTED")).toBe(CHECKS);
      expect(count(outcomes, "RATE_LIMITED")).toBe(LOOP - CHECKS);
    });

    it("counts right passwords from every address, and gives wrong ones back: guesses do not lock the owner out", async () => {
      const username = await newUser();
      // Twice the budget of wrong guesses, each from its own address (no lockout of one).
      for (let i = 0; i < 2 * CHECKS; i++) {
        const guess = await rejection(
          createClient(UserService, from(freshIp())).login({ username, password: `guess ${i}` }),
        );
        expect(guess.reason).toBe("CREDENTIALS_INVALID");
      }
      for (let i = 0; i < CHECKS; i++)
        await createClient(UserService, from(freshIp())).login({ username, password: PASSWORD });
      const over = await rejection(
        createClient(UserService, from(freshIp())).login({ username, password: PASSWORD }),
      );
      expect(over.code).toBe(Code.ResourceExhausted);
      expect(over.reason).toBe("RATE_LIMITED");
      // Another account is not touched by this one's budget.
      const other = await newUser();
      await createClient(UserService, from(freshIp())).login({ username: other, password: PASSWORD });
    });
  });
});

describe("a username's budget of password checks", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("refuses past it with the rest of its minute as Retry-After, counts only checks that hash every time, and starts again when the minute ends", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const limits = createRateLimits(
      loadConfig({ env: {}, overrides: { rateLimit: { passwordChecksPerUsernamePerMinute: 2 } } }).rateLimit,
    );
    const check = (ip: string) => limits.passwords.reserve(ip, "owner", { everyCheck: true });
    await (await check("203.0.113.1")).succeeded();
    // No verdict (a fault, a full pool): given back.
    await (await check("203.0.113.2")).cancelled();
    await (await check("203.0.113.3")).succeeded();
    vi.advanceTimersByTime(20_000);
    const refused = (await check("203.0.113.4").catch((err: unknown) => err)) as TesseraError;
    expect(refused.reason).toBe("RATE_LIMITED");
    expect(refused.headers["retry-after"]).toBe("40");
    // HTTP Basic's check (verified once, then cached) is not counted.
    await (await limits.passwords.reserve("203.0.113.4", "owner")).succeeded();
    vi.advanceTimersByTime(40_000);
    await (await check("203.0.113.4")).succeeded();
    await limits.close();
  });
});
