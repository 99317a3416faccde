import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { App } from "../src/app.js";
import { User } from "../src/storage/entities.js";
import { initORM } from "../src/storage/orm.js";
import { rejection } from "./errors-util.js";
import {
  clientFor,
  createTestApp,
  DATABASES,
  memoryTransport,
  SQLITE,
  type TestDatabase,
} from "./helpers.js";
import { adminLogin, basic, bearerMachine, clients, short, tenantWithAdmin } from "./machine-fixtures.js";

/**
 * The authentication state cache (SqlRunner.cachedGet; SQLite's data_version and TEMP
 * triggers, PostgreSQL's LISTEN/NOTIFY): repeated requests
 * are answered from memory, and no change, whoever makes it, is ever answered from a
 * stale entry. Every test warms the cache first, so a missed invalidation would show up
 * as an accepted request that must be refused (or the reverse).
 */

const PASSWORD = "state cache password";
/** Let the event loop turn, as between two requests from the network. */
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

async function setUp(db: TestDatabase) {
  const app = await createTestApp(db);
  const transport = memoryTransport(app);
  const admin = await adminLogin(transport);
  const root = clients(transport, admin);
  return { app, transport, admin, root };
}

describe.each(DATABASES)("authentication state cache ($name)", (db) => {
  let app: App;
  let transport: ReturnType<typeof memoryTransport>;
  let admin: string;
  let root: ReturnType<typeof clients>;

  beforeAll(async () => {
    ({ app, transport, admin, root } = await setUp(db));
  });
  afterAll(async () => {
    await app.close();
  });

  /** A user with a session token, a personal access token and Basic credentials. */
  async function user(scopes = ["cluster:read", "cluster:write"]) {
    const username = `sc-${short()}`;
    const { user } = await root.users.createUser({ username, password: PASSWORD, scopes });
    const jwt = (await createClient(UserService, transport).login({ username, password: PASSWORD }))
      .accessToken;
    const pat = await clientFor(TokenService, transport, jwt).createPersonalAccessToken({ name: "sc" });
    const as = {
      jwt: clientFor(UserService, transport, jwt),
      pat: clientFor(UserService, transport, pat.token),
      basic: clients(transport, basic(username, PASSWORD)).users,
    };
    return { id: user!.id, username, jwt, pat, as };
  }

  /**
   * Every way `u` authenticates, warmed twice, must give `expected` (a reason, or "ok"),
   * except where `per` names another outcome for one way.
   */
  async function expectAll(
    u: Awaited<ReturnType<typeof user>>,
    expected: string,
    per: Partial<Record<keyof typeof u.as, string>> = {},
  ) {
    for (const [how, client] of Object.entries(u.as)) {
      const want = per[how as keyof typeof u.as] ?? expected;
      for (let i = 0; i < 2; i++) {
        const outcome = await client.getCurrentUser({}).then(
          () => "ok",
          async (err: unknown) => (await rejection(Promise.reject(err))).reason,
        );
        expect(`${how}: ${outcome}`).toBe(`${how}: ${want}`);
      }
    }
  }

  it("answers repeated authentications from memory", async () => {
    const u = await user();
    await expectAll(u, "ok");
    const before = app.sql.cacheStats();
    for (let i = 0; i < 20; i++) await u.as.jwt.getCurrentUser({});
    const after = app.sql.cacheStats();
    expect(after.enabled).toBe(true);
    expect(after.hits - before.hits).toBe(20);
    expect(after.misses - before.misses).toBe(0);
  });

  it("refuses a user disabled through the API on the next request, and accepts it again when enabled (but not its ended session)", async () => {
    const u = await user();
    await expectAll(u, "ok");
    await root.users.updateUser({ id: u.id, disabled: true });
    // Basic answers a disabled account's correct password like a wrong one (no oracle).
    await expectAll(u, "PRINCIPAL_DISABLED", { basic: "CREDENTIALS_INVALID" });
    await root.users.updateUser({ id: u.id, disabled: false });
    await expectAll(u, "ok", { jwt: "TOKEN_REVOKED" });
  });

  it("applies a scope change on the next request", async () => {
    const u = await user(["cluster:read", "cluster:write"]);
    expect((await u.as.pat.getCurrentUser({})).permissions).toEqual(["cluster:read", "cluster:write"]);
    await root.users.updateUser({ id: u.id, scopes: { scopes: ["cluster:read"] } });
    for (const client of Object.values(u.as))
      expect((await client.getCurrentUser({})).permissions).toEqual(["cluster:read"]);
  });

  it("refuses a revoked personal access token on the next request", async () => {
    const u = await user();
    await expectAll(u, "ok");
    await clientFor(TokenService, transport, u.jwt).revokePersonalAccessToken({ id: u.pat.id });
    const r = await rejection(u.as.pat.getCurrentUser({}));
    expect(r.reason).toBe("TOKEN_REVOKED");
    expect((await u.as.jwt.getCurrentUser({})).username).toBe(u.username);
  });

  it("refuses the old password after a password reset", async () => {
    const u = await user();
    await expectAll(u, "ok");
    await root.users.updateUser({ id: u.id, password: "a brand new password" });
    const r = await rejection(u.as.basic.getCurrentUser({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("CREDENTIALS_INVALID");
    const fresh = clients(transport, basic(u.username, "a brand new password")).users;
    expect((await fresh.getCurrentUser({})).username).toBe(u.username);
  });

  it("refuses a deleted user's credentials on the next request", async () => {
    const u = await user();
    await expectAll(u, "ok");
    await root.users.deleteUser({ id: u.id });
    for (const client of Object.values(u.as)) {
      const r = await rejection(client.getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
    }
  });

  it("refuses users and machine users of a tenant disabled through the API", async () => {
    const t = await tenantWithAdmin(transport, admin);
    const m = await bearerMachine(transport, t.token, [t.application.id]);
    const machine = clients(transport, m.token).machines;
    const tenantAdmin = clients(transport, t.token).users;
    expect((await machine.checkAuthentication({})).machineUserId).toBe(m.machine.id);
    expect((await tenantAdmin.getCurrentUser({})).username).toBe(t.username);
    await root.tenants.updateTenant({ id: t.tenant.id, disabled: true });
    expect((await rejection(machine.checkAuthentication({}))).reason).toBe("PRINCIPAL_DISABLED");
    expect((await rejection(tenantAdmin.getCurrentUser({}))).reason).toBe("PRINCIPAL_DISABLED");
    await root.tenants.updateTenant({ id: t.tenant.id, disabled: false });
    expect((await machine.checkAuthentication({})).machineUserId).toBe(m.machine.id);
  });

  it("applies machine-user changes (disabling, deletion) on the next request", async () => {
    const t = await tenantWithAdmin(transport, admin);
    const m = await bearerMachine(transport, t.token, [t.application.id]);
    const machine = clients(transport, m.token).machines;
    const tenantAdmin = clients(transport, t.token).machines;
    expect((await machine.checkAuthentication({})).machineUserId).toBe(m.machine.id);
    await tenantAdmin.updateMachineUser({ id: m.machine.id, disabled: true });
    expect((await rejection(machine.checkAuthentication({}))).reason).toBe("PRINCIPAL_DISABLED");
    await tenantAdmin.updateMachineUser({ id: m.machine.id, disabled: false });
    expect((await machine.checkAuthentication({})).machineUserId).toBe(m.machine.id);
    await tenantAdmin.deleteMachineUser({ id: m.machine.id });
    expect((await rejection(machine.checkAuthentication({}))).code).toBe(Code.Unauthenticated);
  });

  it("applies a change written with raw SQL or a native ORM query, not only through the services", async () => {
    const u = await user();
    await expectAll(u, "ok");
    await app.sql.run("update users set disabled = ? where id = ?", [true, u.id]);
    // Basic answers a disabled account's correct password like a wrong one (no oracle).
    await expectAll(u, "PRINCIPAL_DISABLED", { basic: "CREDENTIALS_INVALID" });
    await app.storage.em.fork().nativeUpdate(User, { id: u.id }, { disabled: false });
    await expectAll(u, "ok");
  });

  it("refuses a session's access token once its session is revoked with raw SQL", async () => {
    const u = await user();
    await expectAll(u, "ok");
    const sid = JSON.parse(Buffer.from(u.jwt.split(".")[1]!, "base64url").toString()).sid as string;
    await app.sql.run("update sessions set revoked_at = ? where id = ?", [new Date(), sid]);
    await expectAll(u, "ok", { jwt: "TOKEN_REVOKED" });
  });

  it("never keeps what a transaction wrote and then rolled back", async () => {
    const u = await user();
    await expectAll(u, "ok");
    const em = app.storage.em.fork();
    await em.begin();
    try {
      await em.nativeUpdate(User, { id: u.id }, { disabled: true });
      // On SQLite this request shares the transaction's connection; whatever it sees,
      // nothing it read may outlive the rollback.
      await u.as.jwt.getCurrentUser({}).catch(() => undefined);
    } finally {
      await em.rollback();
    }
    await expectAll(u, "ok");
  });

  it("refuses to cache a statement that reads a table whose changes it does not watch", async () => {
    if (db.name !== "sqlite") return;
    // SQLite's cachedGet answers in the calling turn (its driver is synchronous): so does its refusal.
    expect(() => app.sql.cachedGet("select id from audit_events where id = ?", ["x"])).toThrow(
      /does not watch: audit_events/,
    );
  });
});

describe("authentication state cache: writes by another process (sqlite file)", () => {
  let dir: string;
  let app: App;
  let transport: ReturnType<typeof memoryTransport>;
  let root: ReturnType<typeof clients>;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tessera-state-cache-"));
    const file: TestDatabase = { ...SQLITE, url: () => `sqlite:${join(dir, "tessera.db")}` };
    ({ app, transport, root } = await setUp(file));
  });
  afterAll(async () => {
    await app.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("sees a commit by another connection from the next event-loop turn on", async () => {
    const username = `ext-${short()}`;
    const { user } = await root.users.createUser({ username, password: PASSWORD, scopes: [] });
    const jwt = (await createClient(UserService, transport).login({ username, password: PASSWORD }))
      .accessToken;
    const me = clientFor(UserService, transport, jwt);
    await me.getCurrentUser({});
    await me.getCurrentUser({});
    const warmed = app.sql.cacheStats();
    expect(warmed.hits).toBeGreaterThan(0);

    // Another tessera process, the sqlite3 shell, a restore: anything but this connection.
    const other = await initORM({ url: `sqlite:${join(dir, "tessera.db")}`, migrate: false });
    const write = (sql: string, params: unknown[]) => other.em.getConnection().execute(sql, params, "run");
    try {
      await write("update users set disabled = 1 where id = ?", [user!.id]);
      await nextTurn();
      expect((await rejection(me.getCurrentUser({}))).reason).toBe("PRINCIPAL_DISABLED");
      await write("update users set disabled = 0 where id = ?", [user!.id]);
      await nextTurn();
      const { tenantId } = await me.getCurrentUser({});
      // The same for a refusal that depends on a joined row (the user's tenant).
      await write("update tenants set disabled = 1 where id = ?", [tenantId]);
      await nextTurn();
      expect((await rejection(me.getCurrentUser({}))).reason).toBe("PRINCIPAL_DISABLED");
    } finally {
      await other.close();
    }
    expect(app.sql.cacheStats().invalidations).toBeGreaterThan(warmed.invalidations);
  });
});
