import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { Tenant, User } from "../src/storage/entities.js";
import { createTestApp, DATABASES } from "./helpers.js";

const STATE = "select id, disabled from users where id = ?";
const ALL = "select id, disabled from users where id = ? or id = ?";
type Row = { id: string; disabled: unknown };
const disabled = (row: Row | undefined) => row?.disabled === true || row?.disabled === 1;

/**
 * The raw SQL runner answers from committed state only: a read issued while another async
 * context's transaction is open on SQLite's one connection waits for it to end; the
 * transaction's own reads see its own writes (PostgreSQL: a pool, another connection).
 */
describe.each(DATABASES)("raw reads and open transactions, on $name", (db) => {
  let app: App;
  let userId: string;

  beforeAll(async () => {
    app = await createTestApp(db);
    userId = (await app.storage.em.fork().findOneOrFail(User, { username: "admin" })).id;
  }, 120_000);

  afterAll(async () => {
    await app?.close();
  });

  /**
   * Disable the user in a transaction; `inside` runs in it after the write, `outside` runs in
   * the test's own context while it is open; then the transaction is rolled back.
   */
  async function disabledThenRolledBack<A, B>(inside: () => Promise<A>, outside: () => Promise<B>) {
    let opened!: () => void;
    const open = new Promise<void>((resolve) => {
      opened = resolve;
    });
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let own: A | undefined;
    const tx = app.storage.em.fork().transactional(async (t) => {
      await t.nativeUpdate(User, { id: userId }, { disabled: true });
      own = await inside();
      opened();
      await released;
      throw new Error("rolled back");
    });
    await open;
    let settled = false;
    const theirs = outside().finally(() => {
      settled = true;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    const settledWhileOpen = settled;
    release();
    await expect(tx).rejects.toThrow("rolled back");
    return { own: own as A, theirs: await theirs, settledWhileOpen };
  }

  it("holds another context's reads until the transaction ends, then answers the committed row", async () => {
    const sql = app.sql;
    const r = await disabledThenRolledBack(
      async () => undefined,
      async () => ({
        cached: await sql.cachedGet<Row>(STATE, [userId]),
        cachedAll: await sql.cachedAll<Row>(ALL, [userId, userId]),
        get: await sql.get<Row>(STATE, [userId]),
        all: await sql.all<Row>(ALL, [userId, userId]),
      }),
    );
    if (db.name === "sqlite")
      expect(r.settledWhileOpen, "read while another transaction was open").toBe(false);
    expect(disabled(r.theirs.cached)).toBe(false);
    expect(r.theirs.cachedAll.map(disabled)).toEqual([false]);
    expect(disabled(r.theirs.get)).toBe(false);
    expect(r.theirs.all.map(disabled)).toEqual([false]);
    if (db.name === "sqlite") expect(app.sql.cacheStats().readsHeld).toBeGreaterThan(0);
  });

  it.runIf(db.name === "sqlite")(
    "does not hand the writer's transaction to work a state-change listener defers",
    async () => {
      const sql = app.sql;
      // The listener runs inside the writing statement; what it defers (as the revocation
      // feed's wake does) must read as an outsider, not as the open transaction's own.
      let armed = false;
      let deferred: Promise<Row | undefined> | undefined;
      sql.onStateChange?.(() => {
        if (!armed) return;
        armed = false;
        setImmediate(() => {
          deferred = sql.get<Row>(STATE, [userId]);
        });
      });
      armed = true;
      const r = await disabledThenRolledBack(
        async () => undefined,
        async () => {
          await new Promise((resolve) => setTimeout(resolve, 20));
          return deferred;
        },
      );
      expect(deferred, "the listener ran and deferred its read").toBeDefined();
      expect(disabled(r.theirs), "the deferred read saw the uncommitted write").toBe(false);
    },
  );

  it.runIf(db.name === "sqlite")(
    "answers the transaction's own reads at once, with its own writes",
    async () => {
      const sql = app.sql;
      const r = await disabledThenRolledBack(
        async () => {
          const started = Date.now();
          const cached = sql.cachedGet<Row>(STATE, [userId]);
          return {
            sync: !(cached instanceof Promise),
            cached: await cached,
            get: await sql.get<Row>(STATE, [userId]),
            ms: Date.now() - started,
          };
        },
        async () => sql.get<Row>(STATE, [userId]),
      );
      expect(r.own.sync, "the owner's cached read waited").toBe(true);
      expect(disabled(r.own.cached), "the owner's read did not see its own write").toBe(true);
      expect(disabled(r.own.get)).toBe(true);
      expect(r.own.ms, "the owner's reads waited on its own transaction").toBeLessThan(500);
      expect(disabled(r.theirs)).toBe(false);
    },
  );

  it.runIf(db.name === "sqlite")(
    "serves a read in its turn between back-to-back transactions, none of which leaves a gap",
    async () => {
      // Sixteen loops, each beginning its next transaction as soon as its last ends, each held
      // open across a timer (as a transaction awaiting I/O is): a read that polled for a moment
      // with none open would never find one.
      let stop = false;
      const loops = Array.from({ length: 16 }, async () => {
        while (!stop)
          await app.storage.em.fork().transactional(async (t) => {
            await t.nativeUpdate(Tenant, { id: "no such tenant" }, { name: "x" });
            await new Promise((resolve) => setTimeout(resolve, 5));
          });
      });
      try {
        await new Promise((resolve) => setTimeout(resolve, 50));
        const started = Date.now();
        const row = await app.sql.get<Row>(STATE, [userId]);
        expect(disabled(row)).toBe(false);
        expect(Date.now() - started, "the read waited out its bound").toBeLessThan(900);
      } finally {
        stop = true;
        await Promise.all(loops);
      }
    },
  );
});
