import { describe, expect, it } from "vitest";
import { AuditEventRepository } from "../src/storage/repositories/audit.js";
import { createSqlRunner } from "../src/storage/sql.js";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

const BEFORE = "Migration20261206020000_binder_authority";

/**
 * The audit `actor_outside` migration: events written before it read as of an actor of their
 * own tenant (every one was: a `*` principal's events were in its own tenant, then in none),
 * so none of them is shown as the platform. Down drops the column and keeps the rows.
 */
describe.each(DATABASES)("audit actor_outside migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("reads existing events as of an actor inside their tenant, and drops the column on the way down", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", BEFORE);
    const knex = storage.em.fork().getKnex();
    // A row as the schema before this migration has it.
    await knex("audit_events").insert({
      id: "0193e000-0000-7000-8000-000000000001",
      at: new Date("2026-12-01T10:00:00Z"),
      request_id: "r1",
      tenant_id: "t1",
      actor_kind: "user",
      actor_id: "u1",
      action: "tessera.v1.UserService/UpdateUser",
      target_id: "u2",
      outcome: "success",
      reason: null,
      ip: "192.0.2.1",
    });

    await storage.migrate();
    const events = new AuditEventRepository(await createSqlRunner(storage, { stateCacheSize: 0 }));
    expect(await events.list({ tenantId: "t1" }, 10)).toEqual([
      expect.objectContaining({ actorId: "u1", actorOutside: false }),
    ]);
    expect(await events.list({ tenantId: "t1", actorOutside: true }, 10)).toEqual([]);

    await migrateTo(storage, "down", BEFORE);
    await expect(knex("audit_events").select("actor_outside")).rejects.toThrow(/actor_outside/);
    expect((await knex("audit_events").select("id")).map((r) => r.id)).toEqual([
      "0193e000-0000-7000-8000-000000000001",
    ]);
  });
});
