import { spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { Tenant, User } from "../../src/storage/entities.js";
import { isOutage } from "../../src/storage/errors.js";
import { isLockContention } from "../../src/storage/orm.js";
import { rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

const PASSWORD = "contention password";

/** A call's outcome as a client sees it: its code, and Retry-After when refused. */
function outcome(call: Promise<unknown>): Promise<{ code: string; retryAfter: string | null }> {
  return call.then(
    () => ({ code: "ok", retryAfter: null }),
    (e: unknown) => {
      const err = ConnectError.from(e);
      return { code: Code[err.code]!, retryAfter: err.metadata.get("retry-after") };
    },
  );
}

/** A user's personal access token, and GetCurrentUser with it over TLS. */
async function userWithToken(ts: TestServer) {
  const plain = ts.connect();
  const admin = clients(plain, await adminLogin(plain));
  const username = `gate-${short()}`;
  const id = (await admin.users.createUser({ username, password: PASSWORD })).user!.id;
  const login = await createClient(UserService, plain).login({ username, password: PASSWORD });
  const tokens = createClient(
    TokenService,
    withHeaders(plain, { authorization: `Bearer ${login.accessToken}` }),
  );
  const pat = (await tokens.createPersonalAccessToken({ name: "script" })).token;
  const users = createClient(UserService, withHeaders(ts.connect(), { authorization: `Bearer ${pat}` }));
  return { id, call: () => outcome(users.getCurrentUser({})) };
}

/**
 * SQLite's raw reads wait for other requests' transactions on the one connection (see
 * SqliteReadGate), bounded on the age of the transaction holding it, not on the time queued.
 */
describe("raw SQLite reads and writes queued behind transactions", () => {
  let ts: TestServer;
  let user: Awaited<ReturnType<typeof userWithToken>>;

  beforeAll(async () => {
    // The whole wait's cap (database.connectTimeoutMs) far past any burst below on a loaded
    // machine: these tests are about the bound on the holder's age (see the next describe).
    ts = await startTestServer(SQLITE, { database: { connectTimeoutMs: 60_000 } });
    user = await userWithToken(ts);
    expect((await user.call()).code).toBe("ok");
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  it("answers a call queued behind a burst of short transactions longer than a second in all", async () => {
    const heldBefore = ts.app.sql.cacheStats().readsHeld ?? 0;
    const joinedBefore = ts.app.sql.rawWritesJoined?.();
    const started = performance.now();
    // 250 transactions of ≥ 6 ms each, queued for the one connection: ≥ 1.5 s of queue, none stuck.
    const burst = Array.from({ length: 250 }, () =>
      ts.app.storage.em.fork().transactional(async (tx) => {
        await tx.nativeUpdate(Tenant, { id: "no such tenant" }, { name: "x" });
        await sleep(6);
      }),
    );
    const during = user.call();
    // Issued once one of them is open: with none open (as when the burst is only queued) the
    // write runs at once, and the check below could not fail.
    while (!ts.app.sql.inTransaction?.()) await new Promise((resolve) => setImmediate(resolve));
    const write = ts.app.sql.run("update users set username = username where id = ?", ["nobody"]);
    await Promise.all(burst);
    const burstMs = performance.now() - started;
    await write;
    // Before: { code: "Unavailable", retryAfter: "1" }, refused a second after it queued.
    expect(await during).toEqual({ code: "ok", retryAfter: null });
    expect(burstMs, "the queue ahead of the call lasted past a second").toBeGreaterThan(1_000);
    expect(ts.app.sql.cacheStats().readsHeld, "the call's read waited its turn").toBeGreaterThan(heldBefore);
    // Before: the write ran inside one of the burst's transactions after a second.
    expect(ts.app.sql.rawWritesJoined?.()).toBe(joinedBefore);
  }, 60_000);

  it("refuses reads with Unavailable and Retry-After while a transaction stays open past the bound, at once once it is", async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let opened!: () => void;
    const open = new Promise<void>((resolve) => {
      opened = resolve;
    });
    const stuck = ts.app.storage.em.fork().transactional(async (tx) => {
      await tx.nativeUpdate(User, { id: user.id }, { disabled: true });
      opened();
      await released;
      throw new Error("rolled back");
    });
    await open;
    const openedAt = performance.now();
    const first = await user.call();
    const firstMs = performance.now() - openedAt;
    await sleep(200);
    const laterAt = performance.now();
    const later = await user.call();
    const laterMs = performance.now() - laterAt;
    release();
    await expect(stuck).rejects.toThrow("rolled back");
    expect(first).toEqual({ code: "Unavailable", retryAfter: "1" });
    expect(firstMs, "refused once the transaction had been open a second").toBeGreaterThanOrEqual(950);
    expect(later).toEqual({ code: "Unavailable", retryAfter: "1" });
    // Before: ~1,000 ms, a full bound of its own behind a transaction already past it.
    expect(laterMs, "a call arriving behind a transaction past its bound waited").toBeLessThan(500);
    expect(await user.call()).toEqual({ code: "ok", retryAfter: null });
  }, 30_000);
});

/**
 * The whole wait of a raw SQLite read for the one connection is bounded as PostgreSQL's wait
 * for a free pooled connection is, by `database.connectTimeoutMs`, however the queue moves.
 */
describe("a raw SQLite read's whole wait for the connection", () => {
  const CONNECT_MS = 1_500;
  let ts: TestServer;
  let user: Awaited<ReturnType<typeof userWithToken>>;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { database: { connectTimeoutMs: CONNECT_MS } });
    user = await userWithToken(ts);
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  it("ends after database.connectTimeoutMs behind a queue of short transactions, with Unavailable and Retry-After", async () => {
    const heldBefore = ts.app.sql.cacheStats().readsHeld ?? 0;
    // 500 transactions of ≥ 6 ms each, queued for the one connection: ≥ 3 s of queue, none
    // held near the 1 s bound on a transaction's age.
    let done = 0;
    const burst = Array.from({ length: 500 }, () =>
      ts.app.storage.em
        .fork()
        .transactional(async (tx) => {
          await tx.nativeUpdate(Tenant, { id: "no such tenant" }, { name: "x" });
          await sleep(6);
        })
        .then(() => void done++),
    );
    while (!ts.app.sql.inTransaction?.()) await new Promise((resolve) => setImmediate(resolve));
    const started = performance.now();
    const during = await user.call();
    const ms = performance.now() - started;
    const left = burst.length - done;
    await Promise.all(burst);
    // Before: { code: "ok", retryAfter: null } once the whole burst had run (a fixed 10 s cap).
    expect(during).toEqual({ code: "Unavailable", retryAfter: "1" });
    expect(ts.app.sql.cacheStats().readsHeld, "the call's read waited").toBeGreaterThan(heldBefore);
    expect(ms, "refused once it had waited the configured bound").toBeGreaterThanOrEqual(CONNECT_MS);
    expect(left, "refused while the queue ahead of it still moved").toBeGreaterThan(0);
    // Served again once the queue is gone.
    expect(await user.call()).toEqual({ code: "ok", retryAfter: null });
  }, 60_000);
});

/** Another process holds SQLite's write lock on the file (`BEGIN IMMEDIATE`) for `ms`. */
async function lockedByAnotherProcess(file: string, ms: number): Promise<{ exited: Promise<void> }> {
  const driver = createRequire(import.meta.url).resolve("better-sqlite3");
  const child = spawn(process.execPath, [
    "-e",
    `const db = new (require(${JSON.stringify(driver)}))(${JSON.stringify(file)});
     db.exec("begin immediate");
     process.stdout.write("locked\\n");
     setTimeout(() => { db.exec("commit"); db.close(); }, ${ms});`,
  ]);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once("data", () => resolve());
    child.once("exit", (code) => reject(new Error(`the locking process exited (${code})`)));
  });
  return { exited };
}

describe("a SQLite file whose write lock another process holds", () => {
  let ts: TestServer;
  let file: string;

  beforeAll(async () => {
    file = join(mkdtempSync(join(tmpdir(), "tessera-busy-")), "tessera.db");
    ts = await startTestServer({ name: "sqlite", url: () => `sqlite:${file}` });
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  it("answers a write Unavailable with Retry-After at once, serves meanwhile, and writes its audit events later", async () => {
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    const before = ts.app.audit.stats();
    const lock = await lockedByAnotherProcess(file, 4_000);
    // How long the event loop stood still at most (the driver waits for a lock on its thread).
    let stalled = 0;
    let last = performance.now();
    const ticks = setInterval(() => {
      const now = performance.now();
      stalled = Math.max(stalled, now - last - 10);
      last = now;
    }, 10);
    const started = performance.now();
    const created = await outcome(
      admin.users.createUser({ username: `busy-${short()}`, password: PASSWORD }),
    );
    const ms = performance.now() - started;
    // A Login writes its session (refused alike); reads are served (WAL: a lock blocks writers only).
    const login = await outcome(
      createClient(UserService, ts.connect()).login({ username: "admin", password: ADMIN_PASSWORD }),
    );
    const read = await outcome(admin.users.getCurrentUser({}));
    clearInterval(ticks);
    await lock.exited;
    // Before: "ok" after ~4 s, the whole server stopped in the driver's 5 s busy wait.
    expect(created).toEqual({ code: "Unavailable", retryAfter: "1" });
    expect(ms).toBeLessThan(2_000);
    expect(login).toEqual({ code: "Unavailable", retryAfter: "1" });
    expect(read).toEqual({ code: "ok", retryAfter: null });
    expect(stalled, "the event loop stood still waiting for the lock").toBeLessThan(1_000);
    // The refused call's audit event failed to be written (counted), was kept, and is written now.
    await expect.poll(() => ts.app.audit.stats().depth).toBe(0);
    const after = ts.app.audit.stats();
    expect(after.failures).toBeGreaterThan(before.failures);
    expect(after.written).toBeGreaterThan(before.written);
    expect(after.dropped).toBe(before.dropped);
    // And the write goes through once the lock is gone.
    expect(
      (await outcome(admin.users.createUser({ username: `busy-${short()}`, password: PASSWORD }))).code,
    ).toBe("ok");
  }, 60_000);
  it("refuses a refresh of a disabled tenant's session at once, not Unavailable after waiting for the lock", async () => {
    const t = ts.connect();
    const root = clients(t, await adminLogin(t));
    const { tenant } = await root.tenants.createTenant({ name: `busy-${short()}` });
    const username = `busy-${short()}`;
    await root.users.createUser({ username, password: PASSWORD, tenantId: tenant!.id });
    const users = createClient(UserService, t);
    const login = await users.login({ username, password: PASSWORD, tenant: tenant!.id });
    await root.tenants.updateTenant({ id: tenant!.id, disabled: true });
    const lock = await lockedByAnotherProcess(file, 4_000);
    const started = performance.now();
    const refused = await rejection(users.refreshToken({ refreshToken: login.refreshToken }));
    const ms = performance.now() - started;
    await lock.exited;
    // Before: Unavailable with Retry-After (the refusal waited for SQLite's write lock).
    expect({ code: Code[refused.code], reason: refused.reason }).toEqual({
      code: "Unauthenticated",
      reason: "PRINCIPAL_DISABLED",
    });
    expect(ms).toBeLessThan(2_000);
    // Refused before it was spent: the session goes on once the tenant is enabled again.
    await root.tenants.updateTenant({ id: tenant!.id, disabled: false });
    expect((await users.refreshToken({ refreshToken: login.refreshToken })).refreshToken).not.toBe("");
  }, 60_000);
});

/** The few members of a better-sqlite3 connection the tests below use. */
interface SqliteConnection {
  exec(sql: string): unknown;
  prepare(sql: string): { run(...params: unknown[]): { changes: number } };
  transaction<T>(fn: () => T): () => T;
  close(): void;
}

/**
 * Another connection to the SQLite file, in this process. No busy wait (`timeout: 0`): it
 * runs on the test's event loop, which is the in-process server's too.
 */
function otherConnection(file: string): SqliteConnection {
  const Database = createRequire(import.meta.url)("better-sqlite3") as new (
    file: string,
    options: { timeout: number },
  ) => SqliteConnection;
  return new Database(file, { timeout: 0 });
}

/**
 * A transaction that reads and then writes (DeleteApplication: it reads the application and
 * what it affects, then deletes it), while another connection to the file (the CLI, a second
 * Tessera) writes in between. A deferred BEGIN takes no lock: the transaction's reads pin a
 * snapshot, and its first write must upgrade it, which SQLite refuses at once (SQLITE_BUSY
 * while the other holds the write lock, SQLITE_BUSY_SNAPSHOT once it has committed) without
 * asking the busy handler, however short the other's write.
 */
describe("a SQLite file another connection writes to while a transaction runs", () => {
  let ts: TestServer;
  let file: string;

  beforeAll(async () => {
    file = join(mkdtempSync(join(tmpdir(), "tessera-immediate-")), "tessera.db");
    ts = await startTestServer({ name: "sqlite", url: () => `sqlite:${file}` });
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  it("deletes an application although another connection writes between the delete's reads and its write", async () => {
    const admin = clients(ts.connect(), await adminLogin(ts.connect()));
    const { tenant } = await admin.tenants.createTenant({ name: `imm-${short()}` });
    const { application } = await admin.tenants.createApplication({ tenantId: tenant!.id, name: "app" });
    const other = otherConnection(file);
    const write = other.prepare("update tenants set updated_at = updated_at + 1 where id = ?");
    const knex = ts.app.storage.em.getConnection().getKnex();
    const statements: string[] = [];
    let intruder: { took: true; released: Promise<void> } | { took: false; code: string } | undefined;
    const onQuery = (q: { sql: string; __knexTxId?: string }) => {
      if (q.__knexTxId === undefined) return;
      statements.push(q.sql);
      // Told synchronously before the statement runs: just before the transaction's first
      // write, once its reads have run, the other connection writes, and commits 20 ms later
      // (well within the server's busy timeout).
      if (intruder !== undefined || !/^delete from `applications`/.test(q.sql)) return;
      try {
        other.exec("begin immediate");
        write.run(tenant!.id);
        intruder = { took: true, released: sleep(20).then(() => void other.exec("commit")) };
      } catch (err) {
        intruder = { took: false, code: String((err as { code?: unknown }).code) };
      }
    };
    knex.on("query", onQuery);
    let deleted: Awaited<ReturnType<typeof outcome>>;
    try {
      deleted = await outcome(admin.tenants.deleteApplication({ id: application!.id }));
    } finally {
      knex.off("query", onQuery);
      if (intruder?.took) await intruder.released;
    }
    // Before: { code: "Unavailable", retryAfter: "1" } (SQLITE_BUSY on the delete, at once).
    expect(deleted).toEqual({ code: "ok", retryAfter: null });
    expect(statements[0], "the transaction took the write lock at its start").toMatch(/^begin immediate/i);
    // The transaction held the write lock from its BEGIN, before its reads: the other writer
    // was the one to wait (a second process would, within its own busy timeout).
    expect(intruder).toEqual({ took: false, code: "SQLITE_BUSY" });
    expect((await outcome(admin.tenants.getApplication({ id: application!.id }))).code).toBe("NotFound");
    // And the other connection writes once the transaction has committed.
    expect(other.transaction(() => write.run(tenant!.id).changes)()).toBe(1);
    other.close();
  }, 60_000);

  it("lets no other writer change a backend's owner between DeleteApplication's read of its backends and its delete", async () => {
    // On PostgreSQL that window exists (answered FAILED_PRECONDITION: test/lock-order.test.ts).
    // Here the read runs inside the transaction, which holds the write lock from its BEGIN.
    const t = ts.connect();
    const admin = clients(t, await adminLogin(t));
    const app = (await admin.tenants.createApplication({ name: `own-${short()}` })).application!.id;
    const machine = async (applicationIds: string[]) =>
      admin.machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["swarm:deploy"],
        applicationIds,
      });
    const owner = await machine([app]);
    const taker = (await machine([])).machineUser!.id;
    const { backendId } = await clients(t, owner.token).machines.registerBackend({
      applicationId: app,
      callbackUrl: `https://backend-${short()}.example.com/callback`,
      version: "1",
    });
    const other = otherConnection(file);
    const takeOver = other.prepare("update backends set machine_user_id = ? where id = ?");
    const knex = ts.app.storage.em.getConnection().getKnex();
    const statements: string[] = [];
    let tried: string | undefined;
    const onQuery = (q: { sql: string; __knexTxId?: string }) => {
      if (q.__knexTxId === undefined) return;
      statements.push(q.sql);
      // Told synchronously before the transaction's first read of the backends runs.
      if (tried !== undefined || !/ from `backends`/.test(q.sql)) return;
      try {
        tried = `changed ${takeOver.run(taker, backendId).changes}`;
      } catch (err) {
        tried = String((err as { code?: unknown }).code);
      }
    };
    knex.on("query", onQuery);
    let deleted: Awaited<ReturnType<typeof outcome>>;
    try {
      deleted = await outcome(admin.tenants.deleteApplication({ id: app }));
    } finally {
      knex.off("query", onQuery);
      other.close();
    }
    expect(statements[0]).toMatch(/^begin immediate/i);
    expect(statements.some((sql) => / from `backends`/.test(sql))).toBe(true);
    expect(tried).toBe("SQLITE_BUSY");
    expect(deleted).toEqual({ code: "ok", retryAfter: null });
    const { backends } = await admin.machines.listBackends({});
    expect(backends.filter((b) => b.id === backendId)).toEqual([]);
  }, 60_000);

  it("fails a write transaction at its BEGIN while another connection holds the write lock, and runs read-only ones", async () => {
    const other = otherConnection(file);
    const ran: string[] = [];
    other.exec("begin immediate");
    let failed: unknown;
    try {
      failed = await ts.app.storage.em
        .fork()
        .transactional(async (tx) => {
          ran.push("write");
          await tx.nativeUpdate(Tenant, { id: "no such tenant" }, { name: "x" });
        })
        .then(
          () => undefined,
          (err: unknown) => err,
        );
      // A read-only transaction is deferred: it reads beside the other's write lock (WAL).
      ran.push(
        `read ${await ts.app.storage.em.fork().transactional((tx) => tx.count(Tenant, {}), { readOnly: true })}`,
      );
    } finally {
      other.exec("commit");
      other.close();
    }
    // Before: the callback ran (a deferred BEGIN takes no lock) and its write failed.
    expect(ran, "only the read-only transaction's callback ran").toEqual([
      expect.stringMatching(/^read [1-9]/),
    ]);
    // Its own error, not knex's "Transaction query already complete": Unavailable, and a
    // lock contention a migration tries again after.
    expect((failed as { code?: unknown }).code).toBe("SQLITE_BUSY");
    expect(isOutage(failed)).toBe(true);
    expect(isLockContention(failed)).toBe(true);
    // The connection went back to the pool: the next transaction runs.
    await ts.app.storage.em
      .fork()
      .transactional((tx) => tx.nativeUpdate(Tenant, { id: "none" }, { name: "y" }));
  }, 60_000);
});
