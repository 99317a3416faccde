import { describe, expect, it } from "vitest";
import { MachineUserCertificate } from "../src/storage/machine-entities.js";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

/**
 * The proven-bindings migration adds `proven` to certificate bindings: every binding made
 * before it was made without proof of possession, so it reads unproven (displaceable by a
 * proven bind in another tenant), and the column goes again on the way down.
 */
describe.each(DATABASES)("proven certificate bindings migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("marks every existing binding unproven, and drops the column on the way down", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", "Migration20261204213000_usernames_per_tenant");
    const at = new Date("2026-12-01T10:00:00Z");
    const knex = storage.em.fork().getKnex();
    await knex("tenants").insert({ id: "t1", name: "t1", disabled: false, created_at: at, updated_at: at });
    await knex("machine_users").insert({
      id: "m1",
      tenant_id: "t1",
      name: "backend",
      auth_type: "bearer",
      scopes: "",
      disabled: false,
      created_at: at,
      updated_at: at,
    });
    await knex("machine_user_certificates").insert({
      id: "b1",
      machine_user_id: "m1",
      sha256_fingerprint: "a".repeat(64),
      created_at: at,
    });

    await storage.migrate();
    const bindings = await storage.em.fork().find(MachineUserCertificate, {});
    expect(bindings.map((b) => [b.id, b.proven])).toEqual([["b1", false]]);

    await migrateTo(storage, "down", "Migration20261204213000_usernames_per_tenant");
    const columns = Object.keys(await knex("machine_user_certificates").columnInfo());
    expect(columns).not.toContain("proven");
    expect(columns).toContain("sha256_fingerprint");
  });
});
