import { randomUUID } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { type PruneWalk, pruneSessions } from "../src/services/user/session-pruning.js";
import { createTestApp, DATABASES, migrateTo, migrationStorage } from "./helpers.js";

const DAY = 24 * 3600 * 1000;
const OPTIONS = { refreshTokenTtlSeconds: 3600, maxTokenTtlSeconds: 3600, clockSkewSeconds: 30 };

/** Insert a session with one refresh token expiring at `expires`. */
async function session(app: App, userId: string, created: Date, revoked: Date | null, expires: Date) {
  const id = randomUUID();
  await app.sql.run("insert into sessions (id, user_id, created_at, revoked_at) values (?, ?, ?, ?)", [
    id,
    userId,
    created,
    revoked,
  ]);
  await app.sql.run(
    "insert into refresh_tokens (id, family_id, user_id, token_hash, expires_at, created_at) values (?, ?, ?, ?, ?, ?)",
    [randomUUID(), id, userId, `prune-${id}`, expires, created],
  );
  return id;
}

/**
 * Pruning ended sessions reads what it deletes, not the tables: every statement it runs
 * is answered through an index (before, each batch scanned every session and every refresh
 * token, inside one turn of the event loop on SQLite), and the walk over never-revoked
 * sessions goes on where the last pruning stopped, so sessions still alive before the
 * ended ones do not hide them.
 */
describe.each(DATABASES)("session pruning's reads ($name)", (db) => {
  let app: App | undefined;
  afterEach(async () => {
    await app?.close();
    app = undefined;
  });

  it.runIf(db.name === "sqlite")(
    "answers every statement of a pruning through an index, never a table scan",
    async () => {
      app = await createTestApp(db);
      const admin = await app.sql.get<{ id: string }>("select id from users where username = 'admin'");
      const old = new Date(Date.now() - 40 * DAY);
      const future = new Date(Date.now() + 30 * DAY);
      await session(app, admin!.id, old, old, old);
      await session(app, admin!.id, old, null, old);
      await session(app, admin!.id, old, null, future);
      // Every statement the pruning sends, with its parameters.
      const connection = app.storage.em.getConnection();
      const sent: { sql: string; params: unknown[] }[] = [];
      const execute = connection.execute.bind(connection);
      connection.execute = ((sql: unknown, params: unknown[] = [], ...rest: unknown[]) => {
        if (typeof sql === "string") sent.push({ sql, params });
        return (execute as (...a: unknown[]) => unknown)(sql, params, ...rest);
      }) as typeof connection.execute;
      let deleted: number;
      try {
        deleted = await pruneSessions(app.storage.em.fork(), OPTIONS);
      } finally {
        connection.execute = execute;
      }
      expect(deleted).toBe(2);
      const statements = sent.filter((s) => /^\s*(select|delete)/i.test(s.sql));
      expect(statements.length).toBeGreaterThanOrEqual(3);
      for (const { sql, params } of statements) {
        const plan = await app.sql.all<{ detail: string }>(
          `explain query plan ${sql}`,
          params.map((p) => (p instanceof Date ? p.getTime() : p)),
        );
        const scans = plan.filter((step) => /^SCAN (?!CONSTANT)/.test(step.detail)).map((s) => s.detail);
        expect({ sql, scans }).toEqual({ sql, scans: [] });
      }
    },
  );

  it("walks never-revoked sessions on from where the last pruning stopped", async () => {
    app = await createTestApp(db);
    const admin = await app.sql.get<{ id: string }>("select id from users where username = 'admin'");
    const future = new Date(Date.now() + 30 * DAY);
    // 45 long-lived sessions (opened 40 days ago, refreshed since) before one that ended:
    // more than one pruning reads at batch size 2 (20 batches of each kind).
    for (let i = 0; i < 45; i++)
      await session(app, admin!.id, new Date(Date.now() - 40 * DAY + i), null, future);
    const endedAt = new Date(Date.now() - 39 * DAY);
    const ended = await session(app, admin!.id, endedAt, null, endedAt);
    const exists = async () =>
      Number(
        (await app!.sql.get<{ n: number | string }>("select count(*) as n from sessions where id = ?", [
          ended,
        ]))!.n,
      );
    const walk: PruneWalk = { cursor: null };
    const prune = () => pruneSessions(app!.storage.em.fork(), { ...OPTIONS, batchSize: 2 }, walk);
    expect(await prune()).toBe(0);
    expect(walk.cursor).not.toBeNull();
    expect(await exists()).toBe(1);
    // A fresh walk would read the same 40 sessions again and never reach it.
    expect(await prune()).toBe(1);
    expect(await exists()).toBe(0);
    expect(walk.cursor).toBeNull();
    const alive = await app.sql.get<{ n: number | string }>("select count(*) as n from sessions");
    // The 45 live ones and the bootstrap's own (none of them ended).
    expect(Number(alive!.n)).toBeGreaterThanOrEqual(45);
  });
});

describe.each(DATABASES)("session prune indexes migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("makes the pruning indexes in place of refresh_tokens' family index, and undoes it", async () => {
    const storage = await fresh.open();
    const indexes = async () => {
      const knex = storage.em.fork().getKnex();
      const rows =
        db.name === "sqlite"
          ? await knex.raw("select name from sqlite_master where type = 'index'")
          : (await knex.raw("select indexname as name from pg_indexes where schemaname = current_schema()"))
              .rows;
      return new Set((rows as { name: string }[]).map((r) => r.name));
    };
    await migrateTo(storage, "up", "Migration20261206060000_session_prune_indexes");
    const after = await indexes();
    for (const name of [
      "sessions_revoked_at_index",
      "sessions_open_created_at_id_index",
      "refresh_tokens_family_id_expires_at_index",
    ])
      expect(after.has(name), name).toBe(true);
    expect(after.has("refresh_tokens_family_id_index")).toBe(false);
    await migrateTo(storage, "down", "Migration20261206020000_binder_authority");
    const before = await indexes();
    expect(before.has("refresh_tokens_family_id_index")).toBe(true);
    expect(before.has("sessions_revoked_at_index")).toBe(false);
    expect(before.has("sessions_open_created_at_id_index")).toBe(false);
    expect(before.has("refresh_tokens_family_id_expires_at_index")).toBe(false);
  });
});
