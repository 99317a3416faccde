import { randomUUID } from "node:crypto";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { loadConfig } from "../../src/config.js";
import { TesseraError } from "../../src/errors.js";
import { createRateLimits } from "../../src/rate-limit.js";
import { Code, rejection } from "../errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  startTestServer,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { basic } from "../machine-fixtures.js";
import { freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * Concurrent password guessing against a real server over TLS. The server trusts
 * 127.0.0.1 as a proxy, so each test speaks from its own client address
 * (X-Forwarded-For) and spends no other test's budget.
 */
const LIMITS = {
  ...LIMITS_ON,
  authFailuresPerIpPerMinute: 20,
  authFailuresPerUsernamePerIp: 5,
  authFailuresPerUsernamePerHour: 8,
};
const PASSWORD = "correct horse battery staple";
const GUESSES = 60;
/** Where the right password sits among the concurrent guesses: late, well past every budget. */
const RIGHT_AT = 40;

/** A client address no other test uses. */
const freshIp = freshIps("198.51");

/** PBKDF2 runs started during `fn` (every hash goes through the process's hash pool). */
async function pbkdf2Runs<T>(fn: () => Promise<T>): Promise<{ runs: number; result: T }> {
  const before = hashPool().stats().started;
  const result = await fn();
  return { runs: hashPool().stats().started - before, result };
}

describe.each(DATABASES)("password guessing under concurrency on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let adminToken: string;
  const from = (ip: string) => withHeaders(transport, { "x-forwarded-for": ip });

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: LIMITS,
      server: { trustedProxies: ["127.0.0.1"] },
      // Hashing slow enough that guesses overlap, and a pool that never refuses here.
      auth: { passwordIterations: 20_000, hashConcurrency: 2, hashQueue: 1000 },
    });
    transport = ts.connect();
    adminToken = (
      await createClient(UserService, from(freshIp())).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
  });
  afterAll(async () => {
    await ts.close();
  });

  async function newUser(): Promise<string> {
    const username = `victim-${randomUUID().slice(0, 8)}`;
    await clientFor(UserService, transport, adminToken).createUser({
      username,
      password: PASSWORD,
      scopes: [],
    });
    return username;
  }

  /** 60 guesses at once, each a different wrong password but the right one at RIGHT_AT. */
  async function burst(guess: (password: string) => Promise<unknown>) {
    const passwords = Array.from({ length: GUESSES }, (_, i) =>
      i === RIGHT_AT ? PASSWORD : `wrong guess ${i}`,
    );
    const { runs, result } = await pbkdf2Runs(() =>
      Promise.all(
        passwords.map((p) =>
          guess(p).then(
            () => "accepted" as const,
            (err: unknown) => err,
          ),
        ),
      ),
    );
    const outcomes = await Promise.all(
      result.map(async (r) =>
        r === "accepted" ? { code: undefined, reason: "ACCEPTED" } : rejection(Promise.reject(r)),
      ),
    );
    return { runs, outcomes };
  }

  function expectBounded({ runs, outcomes }: Awaited<ReturnType<typeof burst>>, budget: number): void {
    expect(runs).toBeLessThanOrEqual(budget);
    const verdicts = outcomes.filter((o) => o.reason === "CREDENTIALS_INVALID" || o.reason === "ACCEPTED");
    expect(verdicts.length).toBeLessThanOrEqual(budget);
    expect(outcomes[RIGHT_AT]!.code).toBe(Code.ResourceExhausted);
    expect(outcomes[RIGHT_AT]!.reason).toBe("RATE_LIMITED");
    const refused = outcomes.filter((o) => o.reason === "RATE_LIMITED");
    expect(refused.length).toBeGreaterThanOrEqual(GUESSES - budget);
    for (const r of refused)
      expect(
        Number((r as { error: { metadata: Headers } }).error.metadata.get("retry-after")),
      ).toBeGreaterThan(0);
  }

  it("lets at most the budget of 60 concurrent Login guesses from one IP reach PBKDF2, and refuses the right password among the late ones", async () => {
    const username = await newUser();
    const client = createClient(UserService, from(freshIp()));
    expectBounded(
      await burst((password) => client.login({ username, password })),
      LIMITS.authFailuresPerUsernamePerIp,
    );
  });

  it("lets at most the budget of 60 concurrent HTTP Basic guesses from one IP reach PBKDF2", async () => {
    const username = await newUser();
    const ip = freshIp();
    expectBounded(
      await burst((password) =>
        createClient(UserService, withHeaders(from(ip), basic(username, password))).getCurrentUser({}),
      ),
      LIMITS.authFailuresPerUsernamePerIp,
    );
  });

  it("counts ChangePassword's current-password check: 60 concurrent guesses with a stolen token stay within the budget", async () => {
    const username = await newUser();
    const ip = freshIp();
    const token = (await createClient(UserService, from(freshIp())).login({ username, password: PASSWORD }))
      .accessToken;
    const thief = clientFor(UserService, from(ip), token);
    expectBounded(
      await burst((currentPassword) =>
        thief.changePassword({ currentPassword, newPassword: "the thief's password" }),
      ),
      LIMITS.authFailuresPerUsernamePerIp,
    );
    // The password did not change: the owner still logs in with it, from elsewhere.
    await createClient(UserService, from(freshIp())).login({ username, password: PASSWORD });
  });

  it("counts failures per username across many addresses, so spreading guesses over IPs does not help", async () => {
    const username = await newUser();
    const { runs, result } = await pbkdf2Runs(() =>
      Promise.all(
        Array.from({ length: 30 }, (_, i) =>
          rejection(
            createClient(UserService, from(freshIp())).login({ username, password: `spread guess ${i}` }),
          ),
        ),
      ),
    );
    expect(runs).toBeLessThanOrEqual(LIMITS.authFailuresPerUsernamePerHour);
    expect(result.filter((r) => r.reason === "CREDENTIALS_INVALID").length).toBeLessThanOrEqual(
      LIMITS.authFailuresPerUsernamePerHour,
    );
    const right = await rejection(
      createClient(UserService, from(freshIp())).login({ username, password: PASSWORD }),
    );
    expect(right.code).toBe(Code.ResourceExhausted);
    expect(right.reason).toBe("RATE_LIMITED");
  });

  it("does not let guesses from many addresses refuse a machine user's generated Basic password, never used before", async () => {
    const { machineUser, username, password } = await clientFor(
      MachineUserService,
      transport,
      adminToken,
    ).createMachineUser({ name: `mu-${randomUUID().slice(0, 8)}`, authType: MachineAuthType.BASIC });
    const check = (ip: string, secret: string) =>
      rejection(
        clientFor(MachineUserService, withHeaders(from(ip), basic(username, secret))).checkAuthentication({}),
      );
    // More guesses than the username's budget, spread over addresses: each is refused as wrong,
    // none locks the username (192 random bits are out of reach of any number of guesses).
    const guesses = await Promise.all(
      Array.from({ length: LIMITS.authFailuresPerUsernamePerHour + 4 }, (_, i) =>
        check(freshIp(), `guess-${i}-${randomUUID()}`),
      ),
    );
    expect(guesses.map((r) => r.reason)).toEqual(guesses.map(() => "CREDENTIALS_INVALID"));
    // Its first use: verified (PBKDF2), not refused for the guessers' spending.
    const owner = await clientFor(
      MachineUserService,
      withHeaders(from(freshIp()), basic(username, password)),
    ).checkAuthentication({});
    expect(owner.machineUserId).toBe(machineUser!.id);
  });

  it("locks only the guessing address out of an account: its owner still logs in from another", async () => {
    const username = await newUser();
    const attacker = createClient(UserService, from(freshIp()));
    for (let i = 0; i < LIMITS.authFailuresPerUsernamePerIp; i++)
      expect((await rejection(attacker.login({ username, password: `guess ${i}` }))).reason).toBe(
        "CREDENTIALS_INVALID",
      );
    const locked = await rejection(attacker.login({ username, password: PASSWORD }));
    expect(locked.reason).toBe("RATE_LIMITED");
    const owner = await createClient(UserService, from(freshIp())).login({ username, password: PASSWORD });
    expect(owner.accessToken).not.toBe("");
  });

  it("accepts a valid JWT, and a token verified before, from an IP whose failure budget is spent, and refuses that IP's unknown tokens and passwords", async () => {
    const username = await newUser();
    const token = (await createClient(UserService, from(freshIp())).login({ username, password: PASSWORD }))
      .accessToken;
    const tokens = clientFor(TokenService, from(freshIp()), token);
    const used = (await tokens.createPersonalAccessToken({ name: "used before", scopes: [] })).token;
    const unused = (await tokens.createPersonalAccessToken({ name: "never used", scopes: [] })).token;
    // Verified once (PBKDF2), from another address: from now on it is recognised without hashing.
    expect((await clientFor(UserService, from(freshIp()), used).getCurrentUser({})).username).toBe(username);
    const ip = freshIp();
    const anon = createClient(UserService, from(ip));
    // Spend the IP's budget on other usernames (no single username's budget is touched).
    for (let i = 0; i < LIMITS.authFailuresPerIpPerMinute; i++)
      expect(
        (await rejection(anon.login({ username: `nobody-${i}-${randomUUID()}`, password: "x" }))).reason,
      ).toBe("CREDENTIALS_INVALID");
    expect((await rejection(anon.login({ username, password: PASSWORD }))).reason).toBe("RATE_LIMITED");
    for (const good of [token, used]) {
      const me = await clientFor(UserService, from(ip), good).getCurrentUser({});
      expect(me.username).toBe(username);
    }
    // A token that would need PBKDF2 (a valid one never verified here, an unknown one) and a bad JWT are not verified.
    const before = hashPool().stats().started;
    for (const bad of [unused, "tsr_pat_not-a-real-token", "a.forged.jwt"]) {
      const r = await rejection(clientFor(UserService, from(ip), bad).getCurrentUser({}));
      expect(r.reason, bad).toBe("RATE_LIMITED");
    }
    expect(hashPool().stats().started).toBe(before);
  });
});

describe("the lockout of an address from a username", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  const limitsWith = () =>
    createRateLimits(
      loadConfig({
        env: {},
        overrides: {
          rateLimit: {
            authFailuresPerIpPerMinute: 1000,
            authFailuresPerUsernamePerHour: 1000,
            authFailuresPerUsernamePerIp: 2,
            lockoutSeconds: 60,
            maxLockoutSeconds: 240,
          },
        },
      }).rateLimit,
    );

  /** Spend the address's failures at `username`; the Retry-After of the refusal that follows. */
  async function lockedFor(limits: ReturnType<typeof limitsWith>, ip: string, username: string) {
    for (let i = 0; i < 2; i++) await (await limits.passwords.reserve(ip, username)).failed();
    try {
      await limits.passwords.reserve(ip, username);
    } catch (err) {
      expect(err).toBeInstanceOf(TesseraError);
      expect((err as TesseraError).reason).toBe("RATE_LIMITED");
      return Number((err as TesseraError).headers["retry-after"]);
    }
    throw new Error("expected the address to be locked out");
  }

  it("doubles each time up to its maximum, and starts again after a success", async () => {
    vi.useFakeTimers({ toFake: ["Date", "setTimeout", "clearTimeout"] });
    const limits = limitsWith();
    const ip = "203.0.113.50";
    expect(await lockedFor(limits, ip, "victim")).toBe(60);
    // Another address is not locked out of the account, nor this one out of another account.
    await (await limits.passwords.reserve("203.0.113.51", "victim")).succeeded();
    await (await limits.passwords.reserve(ip, "someone-else")).succeeded();
    vi.advanceTimersByTime(61_000);
    expect(await lockedFor(limits, ip, "victim")).toBe(120);
    vi.advanceTimersByTime(121_000);
    expect(await lockedFor(limits, ip, "victim")).toBe(240);
    vi.advanceTimersByTime(241_000);
    expect(await lockedFor(limits, ip, "victim")).toBe(240);
    vi.advanceTimersByTime(241_000);
    await (await limits.passwords.reserve(ip, "victim")).succeeded();
    expect(await lockedFor(limits, ip, "victim")).toBe(60);
    await limits.close();
  });
});

describe("password guessing across two instances sharing Redis", () => {
  const servers: TestServer[] = [];
  afterAll(async () => {
    for (const ts of servers) await ts.close();
  });

  it("keeps 60 concurrent Login guesses split over both instances within one budget", async () => {
    // Keys in Redis outlive the test: this run's addresses and username are its own.
    const octet = () => 1 + Math.floor(Math.random() * 250);
    const ip = `100.${octet()}.${octet()}.${octet()}`;
    for (let i = 0; i < 2; i++)
      servers.push(
        await startTestServer(DATABASES[0]!, {
          // A generous Redis deadline: this test is about the shared budget, not the fallback
          // (a 50 ms deadline on a loaded machine falls back to per-instance limits).
          rateLimit: { ...LIMITS, redisUrl: "redis://127.0.0.1:6379", redisTimeoutMs: 2000 },
          server: { trustedProxies: ["127.0.0.1"] },
          auth: { passwordIterations: 20_000, hashConcurrency: 2, hashQueue: 1000 },
        }),
      );
    const admin = (
      await createClient(UserService, servers[0]!.connect()).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const username = `victim-${randomUUID()}`;
    // Both instances are separate apps on separate in-memory databases: the user exists on both.
    for (const ts of servers) {
      const token =
        ts === servers[0]
          ? admin
          : (
              await createClient(UserService, ts.connect()).login({
                username: "admin",
                password: ADMIN_PASSWORD,
              })
            ).accessToken;
      await clientFor(UserService, ts.connect(), token).createUser({
        username,
        password: PASSWORD,
        scopes: [],
      });
    }
    const clients = servers.map((ts) =>
      createClient(UserService, withHeaders(ts.connect(), { "x-forwarded-for": ip })),
    );
    const { runs, result } = await pbkdf2Runs(() =>
      Promise.all(
        Array.from({ length: GUESSES }, (_, i) =>
          rejection(clients[i % 2]!.login({ username, password: `shared guess ${i}` })),
        ),
      ),
    );
    expect(runs).toBeLessThanOrEqual(LIMITS.authFailuresPerUsernamePerIp);
    expect(result.filter((r) => r.reason === "CREDENTIALS_INVALID").length).toBeLessThanOrEqual(
      LIMITS.authFailuresPerUsernamePerIp,
    );
    for (const client of clients)
      expect((await rejection(client.login({ username, password: PASSWORD }))).reason).toBe("RATE_LIMITED");
  });
});
