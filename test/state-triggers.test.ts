import { createRequire } from "node:module";
import { setTimeout as sleep } from "node:timers/promises";
import { afterEach, describe, expect, it } from "vitest";
import { type App, createApp } from "../src/app.js";
import { dropSchema, POSTGRES, testConfig } from "./helpers.js";
import { capturingLogger } from "./outage-helpers.js";

const MISSING = /state cache off: tables lack the trigger/;

/** Wait (bounded) until `cond` holds. */
async function until(cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond() && Date.now() < deadline) await sleep(20);
}

/**
 * The PostgreSQL state cache trusts triggers to announce every change: a table whose
 * trigger is missing (dropped, disabled, the table rebuilt) turns the cache off (reads go
 * to the database, so a change to it is seen at once), logged as an error once and
 * counted, at start-up and whenever the listener comes back; restored, the cache is on again.
 */
describe.skipIf(process.env.TESSERA_TEST_SKIP_POSTGRES === "1")("the state triggers check (postgres)", () => {
  const apps: { app: App; url: string }[] = [];
  afterEach(async () => {
    for (const { app, url } of apps.splice(0)) {
      await app.close();
      await dropSchema(url);
    }
  });
  const start = async (url = POSTGRES.url()) => {
    const { logger, log } = capturingLogger();
    const app = await createApp(testConfig(url), { logger });
    apps.push({ app, url });
    return { app, log, url };
  };
  /** The cached read of the authentication path for `username`'s row, as the cache answers it. */
  const disabled = async (app: App, username: string) => {
    const row = await app.sql.cachedGet<{ disabled: boolean | number }>(
      "select disabled from users where username = ?",
      [username],
    );
    return Boolean(row?.disabled);
  };

  it("turns the cache off when a trigger is dropped (found when the listener comes back), reads through exactly, and on again once restored", async () => {
    const { app, log } = await start();
    const conn = app.storage.em.getConnection();
    expect(app.sql.cacheStats()).toMatchObject({ enabled: true, triggersMissing: 0 });
    await conn.execute("drop trigger tessera_state_notify on users");
    // The listener lost and back (a restart of PostgreSQL, a network cut): checked again.
    app.notifier!.reset("test: listener lost");
    await until(() => app.notifier!.online && app.sql.cacheStats().triggersMissing === 1);
    expect(app.sql.cacheStats()).toMatchObject({ enabled: false, triggersMissing: 1 });
    expect(log.count(MISSING)).toBe(1);
    expect(log.lines.find((l) => MISSING.test(String(l.msg)))).toMatchObject({
      level: 50,
      tables: ["users"],
    });

    // Read through: a change no trigger announces is still seen on the next read.
    expect(await disabled(app, "admin")).toBe(false);
    const hits = app.sql.cacheStats().hits;
    await conn.execute("update users set disabled = true where username = 'admin'");
    expect(await disabled(app, "admin")).toBe(true);
    expect(app.sql.cacheStats().hits).toBe(hits);
    await conn.execute("update users set disabled = false where username = 'admin'");

    // Another reconnect with the trigger still missing: no second error line.
    app.notifier!.reset("test: listener lost again");
    await until(() => app.notifier!.online);
    await sleep(300);
    expect(log.count(MISSING)).toBe(1);

    // Restored: on again at the next check, and caching.
    await conn.execute(
      "create trigger tessera_state_notify after insert or update or delete on users for each row execute function tessera_state_notify()",
    );
    await conn.execute("alter table users enable always trigger tessera_state_notify");
    app.notifier!.reset("test: listener lost once more");
    await until(() => app.sql.cacheStats().enabled);
    expect(app.sql.cacheStats()).toMatchObject({ enabled: true, triggersMissing: 0 });
    await disabled(app, "admin");
    const before = app.sql.cacheStats().hits;
    await disabled(app, "admin");
    expect(app.sql.cacheStats().hits).toBe(before + 1);
  });

  it("notices a trigger disabled, or set to fire only for replicas, while it runs (within the periodic check), and a truncate empties the cache", async () => {
    const { app, log } = await start();
    const conn = app.storage.em.getConnection();
    expect(app.sql.cacheStats()).toMatchObject({ enabled: true, triggersMissing: 0 });
    // A truncate fires no row trigger: the statement trigger announces it.
    await disabled(app, "admin");
    const before = app.sql.cacheStats().invalidations;
    await conn.execute("truncate machine_user_applications");
    await until(() => app.sql.cacheStats().invalidations > before, 3_000);
    expect(app.sql.cacheStats().invalidations).toBeGreaterThan(before);

    for (const [how, undo] of [
      ["disable trigger", "enable always trigger"],
      // Fires only in sessions whose session_replication_role is replica: not for ordinary writers.
      ["enable replica trigger", "enable always trigger"],
      // Fires for ordinary writers, but not for a replication apply or a bulk loader in replica role.
      ["enable trigger", "enable always trigger"],
    ] as const) {
      await conn.execute(`alter table users ${how} tessera_state_notify`);
      // No listener loss: the periodic check (every 5 s) finds it.
      await until(() => app.sql.cacheStats().triggersMissing === 1, 8_000);
      expect(app.sql.cacheStats(), how).toMatchObject({ enabled: false, triggersMissing: 1 });
      // Read through: an unannounced change is seen on the next read.
      await conn.execute("update users set disabled = true where username = 'admin'");
      expect(await disabled(app, "admin")).toBe(true);
      await conn.execute("update users set disabled = false where username = 'admin'");
      await conn.execute(`alter table users ${undo} tessera_state_notify`);
      await until(() => app.sql.cacheStats().enabled, 8_000);
      expect(app.sql.cacheStats(), `${how}, undone`).toMatchObject({ enabled: true, triggersMissing: 0 });
    }
    expect(log.count(MISSING)).toBe(3);
  }, 60_000);

  it("starts with the cache off when a trigger is disabled before start-up", async () => {
    const first = await start();
    await first.app.storage.em
      .getConnection()
      .execute("alter table api_tokens disable trigger tessera_state_notify");
    // A second instance on the same schema starts with the trigger disabled.
    const { logger, log } = capturingLogger();
    const second = await createApp(testConfig(first.url), { logger });
    try {
      expect(second.sql.cacheStats()).toMatchObject({ enabled: false, triggersMissing: 1 });
      expect(log.count(MISSING)).toBe(1);
      expect(log.lines.find((l) => MISSING.test(String(l.msg)))).toMatchObject({ tables: ["api_tokens"] });
    } finally {
      await second.close();
    }
  });
});

/**
 * `database.barrierTimeoutMs` bounds how long a write waits for the other instances'
 * acknowledgements: a listening session of the schema that never acknowledges (an instance
 * frozen mid-flight) holds a state write for that long, and is then ended.
 */
describe.skipIf(process.env.TESSERA_TEST_SKIP_POSTGRES === "1")(
  "the state barrier's bound (postgres)",
  () => {
    it("holds a state write for database.barrierTimeoutMs, not the default, when another listener stays silent, then ends that listener", async () => {
      const url = POSTGRES.url();
      const app = await createApp(testConfig(url, { database: { barrierTimeoutMs: 3_000 } }), {
        logger: capturingLogger().logger,
      });
      // pg (MikroORM's driver) ships no types; the three calls used here.
      const { Client } = createRequire(import.meta.url)("pg") as {
        Client: new (o: {
          connectionString: string;
        }) => {
          connect(): Promise<void>;
          query(sql: string): Promise<unknown>;
          end(): Promise<void>;
          on(event: "error", fn: () => void): void;
        };
      };
      const silent = new Client({ connectionString: app.storage.target.location });
      silent.on("error", () => undefined);
      try {
        await silent.connect();
        // Looks like another instance's listener (same application_name), but never acknowledges.
        await silent.query(`set application_name = '${app.notifier!.applicationName!}'`);
        const timed = async () => {
          const t0 = performance.now();
          await app.sql.run("update users set disabled = false where username = 'admin'");
          return performance.now() - t0;
        };
        const held = await timed();
        // The configured bound, not the 1 s default (a bound above the default, so that a
        // busy machine cannot make the default pass for it), and then not much longer.
        expect(held).toBeGreaterThanOrEqual(2_950);
        expect(held).toBeLessThan(3_000 + 5_000);
        const ended = await silent.query("select 1").then(
          () => false,
          () => true,
        );
        expect(ended).toBe(true);
        // With no silent listener left, a write is not held.
        expect(await timed()).toBeLessThan(2_000);
      } finally {
        await silent.end().catch(() => undefined);
        await app.close();
        await dropSchema(url);
      }
    });
  },
);
