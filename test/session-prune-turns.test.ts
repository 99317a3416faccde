import { randomUUID } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { pruneSessions } from "../src/services/user/session-pruning.js";
import { createTestApp, DATABASES } from "./helpers.js";

describe.each(DATABASES)("session pruning and the event loop ($name)", (db) => {
  let app: App | undefined;
  afterEach(async () => {
    await app?.close();
    app = undefined;
  });

  it("gives the event loop a turn between batches, and still deletes every ended session with its refresh tokens", async () => {
    app = await createTestApp(db);
    const admin = await app.sql.get<{ id: string }>("select id from users where username = 'admin'");
    // Revoked 40 days ago, long past the retention (an hour here): all of them go.
    const old = new Date(Date.now() - 40 * 24 * 3600 * 1000);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const id = randomUUID();
      ids.push(id);
      await app.sql.run("insert into sessions (id, user_id, created_at, revoked_at) values (?, ?, ?, ?)", [
        id,
        admin!.id,
        old,
        old,
      ]);
      await app.sql.run(
        "insert into refresh_tokens (id, family_id, user_id, token_hash, expires_at, created_at) values (?, ?, ?, ?, ?, ?)",
        [randomUUID(), id, admin!.id, `prune-turns-${id}`, old, old],
      );
    }
    // Macrotasks run while the pruning goes: batches of 2 make 3 batches (2 + 2 + 1).
    let turns = 0;
    let pruning = true;
    const tick = () => {
      if (!pruning) return;
      turns++;
      setImmediate(tick);
    };
    setImmediate(tick);
    const deleted = await pruneSessions(app.storage.em.fork(), {
      batchSize: 2,
      refreshTokenTtlSeconds: 3600,
      maxTokenTtlSeconds: 3600,
      clockSkewSeconds: 30,
    });
    pruning = false;
    expect(deleted).toBe(5);
    // SQLite answers every query in the calling turn: before, all batches ran in one turn (0 turns).
    expect(turns).toBeGreaterThanOrEqual(2);
    const left = await app.sql.get<{ n: number | string }>(
      `select count(*) as n from sessions where id in (${ids.map(() => "?").join(", ")})`,
      ids,
    );
    expect(Number(left!.n)).toBe(0);
    const tokens = await app.sql.get<{ n: number | string }>(
      `select count(*) as n from refresh_tokens where family_id in (${ids.map(() => "?").join(", ")})`,
      ids,
    );
    expect(Number(tokens!.n)).toBe(0);
  });
});
