import { describe, expect, it } from "vitest";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

/** This migration, and the one that added the column (each reverted by a `down` to it). */
const TRIGGER = "Migration20261207130000_revocation_tokens_revoked_before";
const COLUMN = "Migration20261207120000_machine_tokens_revoked_before";

/**
 * The revocation-event trigger of machine_users fires on an update of `tokens_revoked_before`
 * alone (Migration20261207130000). Down makes the trigger as it was (the column alone makes
 * no event, the other columns still do), and the column's own migration can then drop it.
 */
describe.each(DATABASES)("revocation event of tokens_revoked_before ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("makes an event of an update of tokens_revoked_before alone, and none once migrated down", async () => {
    const storage = await fresh.open();
    await storage.migrate();
    const knex = storage.em.fork().getKnex();
    const at = new Date("2026-12-01T10:00:00Z");
    await knex("tenants").insert({ id: "t1", name: "t1", disabled: false, created_at: at, updated_at: at });
    await knex("machine_users").insert({
      id: "m1",
      tenant_id: "t1",
      name: "m1",
      auth_type: "bearer",
      scopes: "",
      disabled: false,
      created_at: at,
      updated_at: at,
    });
    const events = async () =>
      (await knex("revocation_events").where({ subject_id: "m1" }).select("kind", "tenant_id")).map(
        (e) => `${e.kind}:${e.tenant_id}`,
      );
    const cutOff = (ms: number) =>
      knex("machine_users")
        .where({ id: "m1" })
        .update({ tokens_revoked_before: new Date(at.getTime() + ms) });

    await cutOff(1_000);
    expect(await events()).toEqual(["subject:t1"]);

    await migrateTo(storage, "down", TRIGGER);
    await cutOff(2_000);
    expect(await events()).toEqual(["subject:t1"]);
    await knex("machine_users").where({ id: "m1" }).update({ disabled: true });
    expect(await events()).toEqual(["subject:t1", "subject:t1"]);
    // No trigger refers to the column any more: its migration drops it.
    await migrateTo(storage, "down", COLUMN);
    await expect(knex("machine_users").select("tokens_revoked_before")).rejects.toThrow(
      /tokens_revoked_before/,
    );
  });
});
