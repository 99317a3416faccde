import { randomUUID } from "node:crypto";
import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { HashPool, hashPool } from "../../src/auth/hash-pool.js";
import { Code, rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basicMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { LIMITS_ON } from "./fixtures.js";

/**
 * Creating a token costs a full PBKDF2, and any user may create tokens: a user holding no
 * scope must not be able to take the hash pool from everyone's logins, nor create secrets
 * without bound. The pool is the 2-core default (1 slot, 4 waiting).
 */
const CREATIONS_PER_HOUR = 12;

describe.each(DATABASES)("credential creation floods on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let adminToken: string;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { ...LIMITS_ON, credentialCreationsPerHour: CREATIONS_PER_HOUR },
      auth: { passwordIterations: 200_000, hashConcurrency: 1, hashQueue: 4 },
    });
    transport = ts.connect();
    adminToken = await adminLogin(transport);
  });
  afterAll(async () => {
    await ts.close();
  });

  /** A user holding no scope, logged in. */
  async function unprivileged(): Promise<string> {
    const username = `mallory-${randomUUID().slice(0, 8)}`;
    await clientFor(UserService, transport, adminToken).createUser({
      username,
      password: "mallory password",
      scopes: [],
    });
    return (await createClient(UserService, transport).login({ username, password: "mallory password" }))
      .accessToken;
  }

  it("answers a login sent while an unprivileged user floods the hash pool with token creations", async () => {
    const tokens = clientFor(TokenService, transport, await unprivileged());
    const pool = hashPool();
    const before = pool.stats();
    const flood = Array.from({ length: 10 }, (_, i) =>
      tokens.createPersonalAccessToken({ name: `flood ${i}`, scopes: [] }),
    );
    const settled = Promise.allSettled(flood);
    // Every creation has reached the pool: running, waiting or refused.
    await vi.waitFor(
      () => {
        const now = pool.stats();
        expect(now.started - before.started + now.queued + (now.refused - before.refused)).toBe(10);
      },
      { timeout: 10_000, interval: 5 },
    );
    const login = await createClient(UserService, transport)
      .login({ username: "admin", password: ADMIN_PASSWORD })
      .then(
        (r) => r.accessToken.length > 0,
        (e: unknown) => e,
      );
    const outcomes = await settled;
    expect(login).toBe(true);
    // The creations that found no room were told to come back (not an internal error).
    for (const o of outcomes.filter((o) => o.status === "rejected")) {
      const e = ConnectError.from((o as PromiseRejectedResult).reason);
      expect(e.code).toBe(Code.Unavailable);
      expect(Number(e.metadata.get("retry-after"))).toBeGreaterThan(0);
    }
    // (How many creations succeed depends on how fast the first ones finish: the share
    // bounds creations in the pool at once, tested directly below.)
  });

  it("refuses a user's token and API key creations past the hourly budget with Retry-After", async () => {
    const tokens = clientFor(TokenService, transport, await unprivileged());
    for (let i = 0; i < CREATIONS_PER_HOUR; i++) {
      if (i % 2 === 0) await tokens.createPersonalAccessToken({ name: `pat ${i}`, scopes: [] });
      else await tokens.createApiKey({ name: `key ${i}`, scopes: [] });
    }
    for (const call of [
      () => tokens.createPersonalAccessToken({ name: "one more", scopes: [] }),
      () => tokens.createApiKey({ name: "one more", scopes: [] }),
    ]) {
      const r = await rejection(call());
      expect(r.code).toBe(Code.ResourceExhausted);
      expect(r.reason).toBe("RATE_LIMITED");
      expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(0);
    }
  });

  it("counts machine-user credential creations and rotations against the caller's budget", async () => {
    const tenant = await tenantWithAdmin(transport, adminToken);
    const m = await basicMachine(transport, tenant.token, [tenant.application.id]);
    const machines = clients(transport, tenant.token).machines;
    for (let i = 1; i < CREATIONS_PER_HOUR; i++)
      await machines.rotateMachineUserCredentials({ id: m.machine.id });
    const r = await rejection(machines.rotateMachineUserCredentials({ id: m.machine.id }));
    expect(r.reason).toBe("RATE_LIMITED");
    expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(0);
  });

  it("counts the passwords a user administrator sets (CreateUser, UpdateUser) against its budget, creating nothing past it", async () => {
    const tenant = await tenantWithAdmin(transport, adminToken, ["admin:users"]);
    const users = clients(transport, tenant.token).users;
    let first: string | undefined;
    for (let i = 0; i < CREATIONS_PER_HOUR; i++) {
      const { user } = await users.createUser({
        username: `u${i}-${short()}`,
        password: "first password",
        scopes: [],
      });
      first ??= user!.username;
    }
    const username = `one-more-${short()}`;
    const r = await rejection(users.createUser({ username, password: "first password", scopes: [] }));
    expect(r.code).toBe(Code.ResourceExhausted);
    expect(r.reason).toBe("RATE_LIMITED");
    expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(0);
    const listed = await users.listUsers({ pageSize: 200 });
    expect(listed.users.map((u) => u.username)).not.toContain(username);
    expect(listed.users).toHaveLength(CREATIONS_PER_HOUR + 1); // and the tenant admin

    // Setting a password on an existing user is a new secret too; other changes are not.
    const target = listed.users.find((u) => u.username === first)!;
    const set = await rejection(users.updateUser({ id: target.id, password: "second password" }));
    expect(set.reason).toBe("RATE_LIMITED");
    expect(Number(set.error.metadata.get("retry-after"))).toBeGreaterThan(0);
    const login = (password: string) =>
      createClient(UserService, transport).login({ username: first!, password, tenant: tenant.tenant.id });
    expect((await login("first password")).accessToken).not.toBe("");
    await users.updateUser({ id: target.id, scopes: { scopes: [] } });
  });

  it("counts a user's own password changes against its budget, not the ones refused for a wrong current password", async () => {
    const username = `changer-${short()}`;
    await clientFor(UserService, transport, adminToken).createUser({
      username,
      password: "password 0000",
      scopes: [],
    });
    const login = async (password: string) =>
      (await createClient(UserService, transport).login({ username, password })).accessToken;
    let token = await login("password 0000");
    const wrong = await rejection(
      clientFor(UserService, transport, token).changePassword({
        currentPassword: "not the password",
        newPassword: "never the password",
      }),
    );
    expect(wrong.reason).toBe("CREDENTIALS_INVALID");
    // A change ends the session (and its access token): each one logs in again.
    for (let i = 1; i <= CREATIONS_PER_HOUR; i++) {
      await clientFor(UserService, transport, token).changePassword({
        currentPassword: `password ${String(i - 1).padStart(4, "0")}`,
        newPassword: `password ${String(i).padStart(4, "0")}`,
      });
      token = await login(`password ${String(i).padStart(4, "0")}`);
    }
    const current = `password ${String(CREATIONS_PER_HOUR).padStart(4, "0")}`;
    const r = await rejection(
      clientFor(UserService, transport, token).changePassword({
        currentPassword: current,
        newPassword: "one more password",
      }),
    );
    expect(r.code).toBe(Code.ResourceExhausted);
    expect(r.reason).toBe("RATE_LIMITED");
    expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(0);
    expect(await login(current)).not.toBe("");
  });
});

describe("the hash pool's share for new secrets", () => {
  /** A task that runs until `release` is called. */
  function held(): { task: () => Promise<void>; release: () => void } {
    let release!: () => void;
    const done = new Promise<void>((resolve) => {
      release = resolve;
    });
    return { task: () => done, release };
  }

  it("refuses a new secret's hash once creations hold half of slots and queue, and still queues a check", async () => {
    const pool = new HashPool({ concurrency: 1, queue: 4 });
    const jobs = [held(), held()];
    const running = jobs.map((j) => pool.run(j.task, "create"));
    await expect(pool.run(async () => undefined, "create")).rejects.toMatchObject({ reason: "UNAVAILABLE" });
    const check = pool.run(async () => "checked");
    for (const j of jobs) j.release();
    await Promise.all(running);
    await expect(check).resolves.toBe("checked");
  });

  it("starts a waiting check before creations that waited longer", async () => {
    const pool = new HashPool({ concurrency: 1, queue: 8 });
    const first = held();
    const order: string[] = [];
    const all = [
      pool.run(first.task, "verify"),
      pool.run(async () => void order.push("create"), "create"),
      pool.run(async () => void order.push("verify")),
    ];
    first.release();
    await Promise.all(all);
    expect(order).toEqual(["verify", "create"]);
  });
});
