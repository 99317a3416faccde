import { describe, expect, it } from "vitest";
import { MachineStateRepository } from "../src/storage/repositories/subject-state.js";
import { createSqlRunner } from "../src/storage/sql.js";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

const BEFORE = "Migration20261206080000_truncate_resets";

/**
 * Certificate bindings per tenant: the migration gives every binding its machine user's
 * tenant, makes identities unique per tenant instead of across tenants, keeps the look-up by
 * fingerprint or SAN URI an index scan, and keeps the revocation events of binding changes.
 * Down restores the global uniques (and fails while an identity is bound in two tenants).
 */
describe.each(DATABASES)("bindings per tenant migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("backfills tenant_id, lets two tenants bind one identity, refuses it twice in one, and goes down", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", BEFORE);
    const at = new Date("2026-12-01T10:00:00Z");
    const knex = storage.em.fork().getKnex();
    for (const t of ["t1", "t2"])
      await knex("tenants").insert({ id: t, name: t, disabled: false, created_at: at, updated_at: at });
    const machine = (id: string, tenant: string) => ({
      id,
      tenant_id: tenant,
      name: id,
      auth_type: "bearer",
      scopes: "",
      disabled: false,
      created_at: at,
      updated_at: at,
    });
    await knex("machine_users").insert([machine("m1", "t1"), machine("m2", "t2"), machine("m3", "t1")]);
    const fp = "a".repeat(64);
    const binding = (id: string, mu: string, fingerprint: string | null, sanUri: string | null) => ({
      id,
      machine_user_id: mu,
      sha256_fingerprint: fingerprint,
      san_uri: sanUri,
      proven: true,
      binder_scopes: "admin:machine-users",
      created_at: at,
    });
    await knex("machine_user_certificates").insert([
      binding("b1", "m1", fp, null),
      binding("b2", "m2", null, "spiffe://x/y"),
    ]);

    await storage.migrate();
    const rows = await knex("machine_user_certificates")
      .select("id", "tenant_id", "proven", "binder_scopes")
      .orderBy("id");
    expect(rows.map((r) => [r.id, r.tenant_id, Boolean(r.proven), r.binder_scopes])).toEqual([
      ["b1", "t1", true, "admin:machine-users"],
      ["b2", "t2", true, "admin:machine-users"],
    ]);
    // The other tenant may bind the same identities; the same tenant may not (one per tenant).
    const withTenant = (b: ReturnType<typeof binding>, tenant: string) => ({ ...b, tenant_id: tenant });
    await knex("machine_user_certificates").insert([
      withTenant(binding("b3", "m2", fp, null), "t2"),
      withTenant(binding("b4", "m1", null, "spiffe://x/y"), "t1"),
    ]);
    await expect(
      knex("machine_user_certificates").insert(withTenant(binding("b5", "m3", fp, null), "t1")),
    ).rejects.toThrow(/unique/i);
    await expect(
      knex("machine_user_certificates").insert(withTenant(binding("b6", "m3", null, "spiffe://x/y"), "t1")),
    ).rejects.toThrow(/unique/i);
    // The look-up of the hot path finds every tenant's binding.
    const machines = new MachineStateRepository(await createSqlRunner(storage, { stateCacheSize: 0 }));
    const found = await machines.bindingsOf(fp, ["spiffe://x/y"]);
    expect(found.map((b) => b.bindingId).sort()).toEqual(["b1", "b2", "b3", "b4"]);
    // Binding changes still make their revocation events (SQLite's triggers went with the old table).
    const before = Number((await knex("revocation_events").count({ n: "*" }))[0]!.n);
    await knex("machine_user_certificates").where({ id: "b4" }).delete();
    await knex("machine_user_certificates").where({ id: "b3" }).update({ proven: false });
    const events = await knex("revocation_events").select("kind", "subject_id", "tenant_id").orderBy("id");
    expect(events.slice(before).map((e) => [e.kind, e.subject_id, e.tenant_id])).toEqual([
      ["subject", "m1", "t1"],
      ["subject", "m2", "t2"],
    ]);
    // A deleted tenant takes its bindings with it.
    await knex("tenants").where({ id: "t2" }).delete();
    expect((await knex("machine_user_certificates").select("id").orderBy("id")).map((r) => r.id)).toEqual([
      "b1",
    ]);

    await migrateTo(storage, "down", BEFORE);
    await expect(knex("machine_user_certificates").select("tenant_id")).rejects.toThrow(/tenant_id/);
    expect((await knex("machine_user_certificates").select("id")).map((r) => r.id)).toEqual(["b1"]);
    // Global uniques again.
    await expect(
      knex("machine_user_certificates").insert({ ...binding("b7", "m3", fp, null) }),
    ).rejects.toThrow(/unique/i);
  });

  it.runIf(db.name === "sqlite")("looks bindings up by fingerprint and SAN URI through indexes", async () => {
    const storage = await fresh.open();
    await storage.migrate();
    const knex = storage.em.fork().getKnex();
    const plan = await knex.raw(
      "explain query plan select b.id from machine_user_certificates b where b.sha256_fingerprint = ? or b.san_uri in (?, ?)",
      ["a".repeat(64), "spiffe://x/1", "spiffe://x/2"],
    );
    const details = (plan as { detail: string }[]).map((r) => r.detail).join("\n");
    expect(details).toMatch(/machine_user_certificates_sha256_fingerprint_index/);
    expect(details).toMatch(/machine_user_certificates_san_uri_index/);
    expect(details).not.toMatch(/^SCAN b$/m);
  });
});
