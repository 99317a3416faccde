import { UniqueConstraintViolationException } from "@mikro-orm/core";
import { describe, expect, it } from "vitest";
import { User } from "../src/storage/entities.js";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

/**
 * The per-tenant usernames migration keeps every existing user (marked to keep logging in
 * with a username alone) and makes a username unique within its tenant only: the same name
 * in another tenant is accepted, the same name twice in one tenant still refused.
 */
describe.each(DATABASES)("usernames per tenant migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("keeps existing users and makes usernames unique per tenant instead of globally", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", "Migration20261204200000_sessions");
    const at = new Date("2026-11-30T10:00:00Z");
    const user = (id: string, tenantId: string, username: string) => ({
      id,
      tenantId,
      username,
      passwordHash: "x",
      scopes: "",
      disabled: false,
      createdAt: at,
      updatedAt: at,
    });
    // Rows written as the schema before this migration has them (the entity has a column more).
    const knex = storage.em.fork().getKnex();
    const oldRow = (id: string, tenantId: string, username: string) => ({
      id,
      tenant_id: tenantId,
      username,
      password_hash: "x",
      scopes: "",
      disabled: false,
      created_at: at,
      updated_at: at,
    });
    for (const id of ["t1", "t2"])
      await knex("tenants").insert({ id, name: id, disabled: false, created_at: at, updated_at: at });
    await knex("users").insert(oldRow("u1", "t1", "alice"));
    // Before: one username across all tenants.
    await expect(knex("users").insert(oldRow("u2", "t2", "alice"))).rejects.toThrow(/unique/i);

    await storage.migrate();
    const after = storage.em.fork();
    await after.insert(User, user("u2", "t2", "alice"));
    await expect(storage.em.fork().insert(User, user("u3", "t1", "alice"))).rejects.toBeInstanceOf(
      UniqueConstraintViolationException,
    );
    // Users from before keep logging in with a username alone; new ones are not marked.
    const users = await storage.em.fork().find(User, {}, { orderBy: { id: "asc" } });
    expect(users.map((u) => [u.id, u.tenantId, u.username, u.tenantlessLogin])).toEqual([
      ["u1", "t1", "alice", true],
      ["u2", "t2", "alice", false],
    ]);

    // Down again (once no name is in two tenants): one username across all tenants.
    await storage.em.fork().nativeDelete(User, { id: "u2" });
    await migrateTo(storage, "down", "Migration20261204200000_sessions");
    await expect(knex("users").insert(oldRow("u4", "t2", "alice"))).rejects.toThrow(/unique/i);
  });
});
