import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import type { App } from "../src/app.js";
import { SessionIssuer } from "../src/services/user/sessions.js";
import { User } from "../src/storage/entities.js";
import { createTestApp, DATABASES } from "./helpers.js";

/**
 * RefreshToken decides its refusals (a disabled user or tenant, a scope narrowing) on a read
 * of the user before the transaction that spends the token: on SQLite that transaction takes
 * the write lock, and a refusal decided inside it waited for another writer and was answered
 * Unavailable (test/security/sqlite-contention.test.ts). Inside, it locks the user's row FOR
 * KEY SHARE on PostgreSQL (storage/lock-order.ts: the user's row before its refresh tokens).
 */
describe.each(DATABASES)("RefreshToken's reads of the user ($name)", (db) => {
  let app: App;
  beforeAll(async () => {
    app = await createTestApp(db);
  });
  afterAll(async () => {
    await app.close();
  });

  it("reads the user before the transaction that spends the token, and locks its row inside", async () => {
    const em = app.storage.em.fork();
    const admin = await em.findOneOrFail(User, { username: "admin" });
    const issuer = new SessionIssuer(app.jwt, 3600);
    const { refreshToken } = await issuer.issue(em, admin);

    const connection = app.storage.em.getConnection();
    const statements: { sql: string; inTransaction: boolean }[] = [];
    const execute = connection.execute.bind(connection);
    const spy = vi.spyOn(connection, "execute").mockImplementation(((query, params, method, ctx, ...rest) => {
      const sql = typeof query === "string" ? query : query.toString();
      statements.push({ sql, inTransaction: ctx !== undefined });
      return execute(query, params, method, ctx, ...rest);
    }) as typeof connection.execute);
    try {
      const fresh = app.storage.em.fork();
      const pair = await issuer.rotate(fresh, refreshToken);
      expect(pair.refreshToken).not.toBe(refreshToken);
    } finally {
      spy.mockRestore();
    }
    const userReads = statements.filter((s) =>
      /^select\b.*\bfrom (?:[`"][^`"]+[`"]\.)?[`"]users[`"]/i.test(s.sql),
    );
    expect(userReads.map((s) => s.inTransaction)).toEqual([false, true]);
    if (db.name === "postgres") expect(userReads[1]!.sql).toMatch(/for key share/i);
  });
});
