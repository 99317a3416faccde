import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { createApp } from "../../src/app.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { parseHash } from "../../src/auth/password.js";
import { User } from "../../src/storage/entities.js";
import { UserStateRepository } from "../../src/storage/repositories/subject-state.js";
import {
  ADMIN_PASSWORD,
  DATABASES,
  memoryTransport,
  silentLogger,
  startTestServer,
  type TestServer,
  testConfig,
  withHeaders,
} from "../helpers.js";
import { adminLogin, clients } from "../machine-fixtures.js";

/** Iterations the users' hashes were made with, and those of the restarted server. */
const OLD_ITERATIONS = 1_000;
const NEW_ITERATIONS = 1_500;
const PASSWORD = "a password made long ago";

/**
 * A login for an unknown name is checked against a stand-in hash at the current
 * `auth.passwordIterations`; an account whose hash was made before that changed took
 * another time, telling existing accounts apart. Hashes made with other parameters are
 * re-made at the current ones on the next successful check (Login, HTTP Basic), so every
 * account converges on the stand-in's cost; nothing refused rewrites a hash. Users made
 * by a server at one count, served by a restarted one at another, over TLS.
 */
describe.each(DATABASES)("password hashes upgraded on login on $name", (db) => {
  let url: string;
  let ts: TestServer;
  const ids: Record<string, string> = {};

  beforeAll(async () => {
    url =
      db.name === "sqlite"
        ? `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-rehash-")), "t.db")}`
        : db.url();
    // Before the configuration changed: users hashed at OLD_ITERATIONS.
    const before = await createApp(testConfig(url, { auth: { passwordIterations: OLD_ITERATIONS } }), {
      logger: silentLogger,
    });
    try {
      const admin = clients(memoryTransport(before), await adminLogin(memoryTransport(before)));
      for (const name of ["alice", "guessed", "disabled", "basic", "basic-guessed", "basic-maker"]) {
        const { user } = await admin.users.createUser({ username: name, password: PASSWORD });
        ids[name] = user!.id;
      }
      await admin.users.updateUser({ id: ids.disabled!, disabled: true });
    } finally {
      await before.close();
    }
    // The same database, restarted with another count (and the rate limits on: HTTP Basic
    // then takes admission's path, a budget-free try before a reserved PBKDF2).
    ts = await startTestServer(
      { name: db.name, url: () => url },
      { auth: { passwordIterations: NEW_ITERATIONS }, rateLimit: { enabled: true } },
    );
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  async function storedHash(name: string): Promise<string> {
    const user = await ts.app.storage.em.fork().findOneOrFail(User, { id: ids[name]! });
    return user.passwordHash;
  }
  const iterationsOf = async (name: string) => parseHash(await storedHash(name))!.iterations;

  async function refusal(call: Promise<unknown>): Promise<ConnectError> {
    const err = await call.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ConnectError);
    return err as ConnectError;
  }

  function basic(username: string, password: string) {
    const header = `Basic ${Buffer.from(`${username}:${password}`).toString("base64")}`;
    return createClient(UserService, withHeaders(ts.connect(), { authorization: header }));
  }

  it("re-hashes a password at the current iterations when a login succeeds, and the new hash logs in", async () => {
    const old = await storedHash("alice");
    expect(parseHash(old)!.iterations).toBe(OLD_ITERATIONS);
    const users = createClient(UserService, ts.connect());
    await users.login({ username: "alice", password: PASSWORD });
    const upgraded = await storedHash("alice");
    expect(parseHash(upgraded)!.iterations).toBe(NEW_ITERATIONS);
    expect(upgraded).not.toBe(old);
    // Once upgraded, a login leaves it alone.
    const again = await users.login({ username: "alice", password: PASSWORD });
    expect(again.user?.id).toBe(ids.alice);
    expect(await storedHash("alice")).toBe(upgraded);
  });

  it("leaves the hash as it is when the password is wrong, and upgrades it at the next right one", async () => {
    const old = await storedHash("guessed");
    const users = createClient(UserService, ts.connect());
    const err = await refusal(users.login({ username: "guessed", password: `${PASSWORD}!` }));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(await storedHash("guessed")).toBe(old);
    await users.login({ username: "guessed", password: PASSWORD });
    expect(await iterationsOf("guessed")).toBe(NEW_ITERATIONS);
  });

  it("leaves the hash as it is when a disabled user's right password is refused, and upgrades it once enabled", async () => {
    const old = await storedHash("disabled");
    const users = createClient(UserService, ts.connect());
    const err = await refusal(users.login({ username: "disabled", password: PASSWORD }));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(await storedHash("disabled")).toBe(old);
    const root = (await users.login({ username: "admin", password: ADMIN_PASSWORD })).accessToken;
    await clients(ts.connect(), root).users.updateUser({ id: ids.disabled!, disabled: false });
    expect(await storedHash("disabled")).toBe(old);
    await users.login({ username: "disabled", password: PASSWORD });
    expect(await iterationsOf("disabled")).toBe(NEW_ITERATIONS);
  });

  it("re-hashes on HTTP Basic too, and the next Basic call needs no PBKDF2", async () => {
    expect(await iterationsOf("basic")).toBe(OLD_ITERATIONS);
    const me = await basic("basic", PASSWORD).getCurrentUser({});
    expect(me.id).toBe(ids.basic);
    expect(await iterationsOf("basic")).toBe(NEW_ITERATIONS);
    // The new hash was made from this password here: known at once, with no hash.
    const started = hashPool().stats().started;
    expect((await basic("basic", PASSWORD).getCurrentUser({})).id).toBe(ids.basic);
    expect(hashPool().stats().started).toBe(started);
  });

  it("leaves the hash as it is when a Basic password is wrong, and upgrades it at the next right one", async () => {
    const old = await storedHash("basic-guessed");
    const err = await refusal(basic("basic-guessed", `${PASSWORD}!`).getCurrentUser({}));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(await storedHash("basic-guessed")).toBe(old);
    await basic("basic-guessed", PASSWORD).getCurrentUser({});
    expect(await iterationsOf("basic-guessed")).toBe(NEW_ITERATIONS);
  });

  it("lets a call authenticated by the Basic password that was just re-hashed create a token with it", async () => {
    const header = `Basic ${Buffer.from(`basic-maker:${PASSWORD}`).toString("base64")}`;
    const tokens = createClient(TokenService, withHeaders(ts.connect(), { authorization: header }));
    const made = await tokens.createPersonalAccessToken({ name: "made over basic" });
    expect(made.token).not.toBe("");
    expect(await iterationsOf("basic-maker")).toBe(NEW_ITERATIONS);
  });

  it("does not put an upgraded hash over a password changed meanwhile", async () => {
    const current = await storedHash("alice");
    const repository = new UserStateRepository(ts.app.sql);
    expect(
      await repository.replacePasswordHash(ids.alice!, `${current}-stale`, "pbkdf2-sha256$1$AA==$AA=="),
    ).toBe(false);
    expect(await storedHash("alice")).toBe(current);
  });
});
