import { mkdtempSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  initORM,
  isLockContention,
  isSchemaDroppedMeanwhile,
  MigrationLockTimeoutError,
  type Storage,
} from "../src/storage/orm.js";
import { DATABASES, dropSchema, POSTGRES, SQLITE } from "./helpers.js";

/** What a query PostgreSQL must refuse rejects with. */
async function refusal(storage: Storage, sql: string): Promise<unknown> {
  try {
    await storage.em.getConnection().execute(sql);
  } catch (err) {
    return err;
  }
  throw new Error(`expected PostgreSQL to refuse: ${sql}`);
}

/** A real PostgreSQL error of the kind a concurrent DROP SCHEMA gives the migrator's look-up. */
function schemaGoneError(storage: Storage): Promise<unknown> {
  return refusal(storage, `select 'tessera_gone_schema.some_table'::regclass`);
}

describe.skipIf(!DATABASES.includes(POSTGRES))("migrate when another schema is dropped meanwhile", () => {
  const open: { storage: Storage; url: string }[] = [];
  afterEach(async () => {
    for (const { storage, url } of open.splice(0)) {
      await storage.close();
      await dropSchema(url);
    }
  });

  async function fresh(): Promise<Storage> {
    const url = POSTGRES.url();
    const storage = await initORM({ url, migrate: false });
    open.push({ storage, url });
    return storage;
  }

  it("recognises PostgreSQL's missing-schema and missing-table errors, and nothing else", async () => {
    const storage = await fresh();
    expect(isSchemaDroppedMeanwhile(await schemaGoneError(storage))).toBe(true);
    expect(isSchemaDroppedMeanwhile(await refusal(storage, "select * from tessera_no_such_table"))).toBe(
      true,
    );
    const syntax = await refusal(storage, "selec 1");
    expect(syntax).toBeInstanceOf(Error);
    expect(isSchemaDroppedMeanwhile(syntax)).toBe(false);
    expect(isSchemaDroppedMeanwhile(new Error("wrapped", { cause: await schemaGoneError(storage) }))).toBe(
      true,
    );
  });

  it("tries again and applies every migration once", async () => {
    const storage = await fresh();
    const migrator = storage.orm.getMigrator();
    const up = migrator.up.bind(migrator);
    let calls = 0;
    migrator.up = (async (...args: Parameters<typeof up>) => {
      calls++;
      // The first attempt meets what a neighbour's DROP SCHEMA does to the look-up.
      if (calls === 1) throw await schemaGoneError(storage);
      return up(...args);
    }) as typeof migrator.up;
    const applied = await storage.migrate();
    expect(calls).toBe(2);
    expect(applied.length).toBeGreaterThan(0);
    expect(await storage.migrate()).toEqual([]);
    const executed = await migrator.getExecutedMigrations();
    expect(executed.map((m) => m.name)).toEqual(applied);
  });

  it("gives up after a few attempts and reports the error", async () => {
    const storage = await fresh();
    const migrator = storage.orm.getMigrator();
    let calls = 0;
    migrator.up = (async () => {
      calls++;
      throw await schemaGoneError(storage);
    }) as typeof migrator.up;
    await expect(storage.migrate()).rejects.toThrow(/tessera_gone_schema/);
    expect(calls).toBe(4);
  });
});

describe("migrate on SQLite", () => {
  it("does not retry (no other schema can vanish there)", async () => {
    const storage = await initORM({ url: SQLITE.url(), migrate: false });
    try {
      const migrator = storage.orm.getMigrator();
      let calls = 0;
      migrator.up = (async () => {
        calls++;
        throw Object.assign(new Error("looks like a PostgreSQL error"), { code: "3F000" });
      }) as typeof migrator.up;
      await expect(storage.migrate()).rejects.toThrow("looks like");
      expect(calls).toBe(1);
    } finally {
      await storage.close();
    }
  });
});

/** Run `fn` inside a transaction of `storage` that stays open until `release()` is called. */
function holdTransaction(
  storage: Storage,
  fn: (run: (sql: string) => Promise<unknown>) => Promise<void>,
): { entered: Promise<void>; release(): void; done: Promise<void> } {
  let release!: () => void;
  let entered!: () => void;
  const inside = new Promise<void>((r) => (entered = r));
  const released = new Promise<void>((r) => (release = r));
  const done = storage.em
    .getConnection()
    .getKnex()
    .transaction(async (trx) => {
      await fn((sql) => trx.raw(sql));
      entered();
      await released;
    });
  return { entered: inside, release, done };
}

/** Make the next migrate() of `storage` also change `users` (as a pending ALTER TABLE would), in its transaction. */
function withPendingAlter(storage: Storage, counter: { attempts: number }): void {
  const migrator = storage.orm.getMigrator();
  const up = migrator.up.bind(migrator);
  migrator.up = (async (options?: Parameters<typeof up>[0]) => {
    counter.attempts++;
    const trx = (options as { transaction?: unknown } | undefined)?.transaction;
    await storage.em
      .getConnection()
      .execute("alter table users add column if not exists lock_probe integer", [], "run", trx as never);
    return up(options);
  }) as typeof migrator.up;
}

describe.skipIf(!DATABASES.includes(POSTGRES))("migrate behind a long transaction (PostgreSQL)", () => {
  const open: { storage: Storage; url: string }[] = [];
  afterEach(async () => {
    for (const { storage, url } of open.splice(0)) {
      await storage.close();
      await dropSchema(url);
    }
  });

  async function pair(budgetMs: number): Promise<{ migrating: Storage; other: Storage; url: string }> {
    const url = POSTGRES.url();
    const other = await initORM({ url, bounds: { statementTimeoutMs: 1_000 } });
    open.push({ storage: other, url });
    const migrating = await initORM({
      url,
      migrate: false,
      bounds: { statementTimeoutMs: 1_000 },
      migrationLocks: { budgetMs },
    });
    open.unshift({ storage: migrating, url: "" });
    return { migrating, other, url };
  }

  it("gives way to other sessions while it waits, and applies once the transaction ends", async () => {
    const { migrating, other } = await pair(20_000);
    const counter = { attempts: 0 };
    withPendingAlter(migrating, counter);
    // A long transaction that read `users`: the ALTER must wait for it.
    const blocker = holdTransaction(other, async (run) => {
      await run("select count(*) from users");
    });
    await blocker.entered;
    const migration = migrating.migrate();
    // Meanwhile, the running instance's reads of `users` are answered, each well within its
    // own 1 s bound: a waiting ALTER without lock_timeout would queue them all (57014).
    const started = Date.now();
    const latencies: number[] = [];
    while (Date.now() - started < 2_500) {
      const t0 = Date.now();
      await other.em.getConnection().execute("select count(*) from users");
      latencies.push(Date.now() - t0);
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(Math.max(...latencies)).toBeLessThan(1_000);
    blocker.release();
    await blocker.done;
    await expect(migration).resolves.toBeInstanceOf(Array);
    expect(counter.attempts).toBeGreaterThan(1);
    const columns = await other.em
      .getConnection()
      .execute(
        "select column_name from information_schema.columns where table_schema = current_schema() and table_name = 'users' and column_name = 'lock_probe'",
      );
    expect(columns).toHaveLength(1);
  });

  it("fails with a clear error once its budget is spent, having applied nothing", async () => {
    const { migrating, other } = await pair(1_500);
    const counter = { attempts: 0 };
    withPendingAlter(migrating, counter);
    const blocker = holdTransaction(other, async (run) => {
      await run("select count(*) from users");
    });
    await blocker.entered;
    const t0 = Date.now();
    const err = await migrating.migrate().then(
      () => undefined,
      (e: unknown) => e,
    );
    const elapsed = Date.now() - t0;
    blocker.release();
    await blocker.done;
    expect(err).toBeInstanceOf(MigrationLockTimeoutError);
    expect((err as Error).message).toMatch(
      /could not take their table locks within 1.5 s.*nothing was applied/,
    );
    expect(counter.attempts).toBeGreaterThan(1);
    expect(elapsed).toBeLessThan(5_000);
    const columns = await other.em
      .getConnection()
      .execute(
        "select column_name from information_schema.columns where table_schema = current_schema() and table_name = 'users' and column_name = 'lock_probe'",
      );
    expect(columns).toHaveLength(0);
  });

  it("recognises lock contention, and nothing else, as worth another attempt", async () => {
    expect(isLockContention(Object.assign(new Error("lock timeout"), { code: "55P03" }))).toBe(true);
    expect(isLockContention(Object.assign(new Error("deadlock"), { code: "40P01" }))).toBe(true);
    expect(isLockContention(Object.assign(new Error("busy"), { code: "SQLITE_BUSY_SNAPSHOT" }))).toBe(true);
    expect(isLockContention(Object.assign(new Error("syntax"), { code: "42601" }))).toBe(false);
  });
});

describe("migrate behind another writer (SQLite file)", () => {
  it("tries again when the write lock is held past the busy timeout, and applies", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-migrate-"));
    const url = `sqlite:${join(dir, "t.db")}`;
    const other = await initORM({ url });
    const migrating = await initORM({ url, migrate: false, migrationLocks: { budgetMs: 20_000 } });
    try {
      // Fail fast on the held lock instead of after 5 s, to see the retry.
      await migrating.em.getConnection().execute("pragma busy_timeout = 50");
      const counter = { attempts: 0 };
      const migrator = migrating.orm.getMigrator();
      const up = migrator.up.bind(migrator);
      migrator.up = (async (options?: Parameters<typeof up>[0]) => {
        counter.attempts++;
        await migrating.em.getConnection().execute("create table if not exists lock_probe (id integer)");
        return up(options);
      }) as typeof migrator.up;
      // Another process's write transaction (an instance flushing, say) holds the lock 1 s.
      const writer = new (createRequire(import.meta.url)("better-sqlite3"))(join(dir, "t.db"));
      writer.exec("begin immediate");
      const released = new Promise<void>((r) =>
        setTimeout(() => {
          writer.exec("commit");
          writer.close();
          r();
        }, 1_000),
      );
      await expect(migrating.migrate()).resolves.toEqual([]);
      await released;
      expect(counter.attempts).toBeGreaterThan(1);
    } finally {
      await migrating.close();
      await other.close();
    }
  });
});
