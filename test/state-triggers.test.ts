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
    app.notifier!.reset("test: listener lost once more");
    await until(() => app.sql.cacheStats().enabled);
    expect(app.sql.cacheStats()).toMatchObject({ enabled: true, triggersMissing: 0 });
    await disabled(app, "admin");
    const before = app.sql.cacheStats().hits;
    await disabled(app, "admin");
    expect(app.sql.cacheStats().hits).toBe(before + 1);
  });

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
