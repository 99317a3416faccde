import { randomUUID } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { LAST_USED_ROWS_PER_TURN, LastUsedTracker } from "../src/auth/last-used.js";
import { CredentialRepository } from "../src/storage/repositories/credentials.js";
import { toMillis } from "../src/storage/sql.js";
import { createTestApp, DATABASES, silentLogger } from "./helpers.js";

describe.each(DATABASES)("the last-used flush ($name)", (db) => {
  let app: App | undefined;
  afterEach(async () => {
    await app?.close();
    app = undefined;
  });

  it("writes at most LAST_USED_ROWS_PER_TURN rows per event-loop turn, and every one of them", async () => {
    app = await createTestApp(db);
    const credentials = new CredentialRepository(app.sql);
    // Per update: how many updates ran since a macrotask queued after the previous turn's last one ran.
    let sinceTurn = 0;
    let most = 0;
    let turnQueued = false;
    let calls = 0;
    const counting = {
      markUsed: (table: Parameters<CredentialRepository["markUsed"]>[0], id: string, at: Date) => {
        calls++;
        sinceTurn++;
        most = Math.max(most, sinceTurn);
        if (!turnQueued) {
          turnQueued = true;
          setImmediate(() => {
            turnQueued = false;
            sinceTurn = 0;
          });
        }
        return credentials.markUsed(table, id, at);
      },
    };
    const tracker = new LastUsedTracker(counting, silentLogger, 60);
    // A real token among many credentials used since the last flush (the others' rows are gone: 0 rows each).
    const tokenId = randomUUID();
    const now = new Date();
    const admin = await app.sql.get<{ id: string; tenant_id: string }>(
      "select id, tenant_id from users where username = 'admin'",
    );
    await app.sql.run(
      "insert into api_tokens (id, public_id, kind, tenant_id, owner_user_id, name, scopes, secret_hash, hint, created_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      [
        tokenId,
        tokenId.slice(0, 16),
        "pat",
        admin!.tenant_id,
        admin!.id,
        "turns",
        "",
        "unused",
        "tsr_pat_…abcd",
        now,
      ],
    );
    const n = 5 * LAST_USED_ROWS_PER_TURN + 3;
    const used = new Date(now.getTime() + 1000);
    tracker.mark("api_tokens", tokenId, used);
    for (let i = 1; i < n; i++) tracker.mark("machine_credentials", randomUUID(), used);
    expect(await tracker.flush()).toBe(true);
    expect(calls).toBe(n);
    expect(tracker.stats()).toMatchObject({ depth: 0, written: n, dropped: 0 });
    // SQLite answers in the calling turn: before, all n ran in one turn. PostgreSQL waits on its socket anyway.
    expect(most).toBeLessThanOrEqual(LAST_USED_ROWS_PER_TURN);
    const row = await app.sql.get<{ last_used_at: unknown }>(
      "select last_used_at from api_tokens where id = ?",
      [tokenId],
    );
    expect(toMillis(row!.last_used_at)).toBe(used.getTime());
    await tracker.close();
  });
});
