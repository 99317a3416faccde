import { describe, expect, it } from "vitest";
import { machineOfCertificate } from "../src/auth/machine-principal.js";
import type { PeerCertificateInfo } from "../src/auth/principal.js";
import { MachineUserCertificate } from "../src/storage/machine-entities.js";
import { MachineStateRepository } from "../src/storage/repositories/subject-state.js";
import { createSqlRunner } from "../src/storage/sql.js";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

const BEFORE = "Migration20261205100000_revocation_events";

/** A certificate as the TLS layer describes it: only the fingerprint and SAN URIs matter here. */
function certificate(fingerprint: string, ...sanUris: string[]): PeerCertificateInfo {
  return {
    sha256Fingerprint: fingerprint,
    thumbprint: "",
    commonName: null,
    sanUris,
  } as unknown as PeerCertificateInfo;
}

/**
 * The binder-authority migration records no authority for the bindings made before it:
 * their binder is unknown, so an unproven fingerprint binding from before it no longer
 * outranks the SAN URI binding of a machine user holding scopes (it may still outrank that
 * of a scopeless one), and an unproven SAN URI binding from before it contests only a
 * scopeless machine user's. Down drops the column again.
 */
describe.each(DATABASES)("binder authority migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("reads existing fingerprint and SAN URI bindings as bound with no authority, and drops the column on the way down", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", BEFORE);
    const at = new Date("2026-12-01T10:00:00Z");
    // Rows written as the schema before this migration has them (the entity has a column more).
    const knex = storage.em.fork().getKnex();
    await knex("tenants").insert({ id: "t1", name: "t1", disabled: false, created_at: at, updated_at: at });
    const machine = (id: string, scopes: string) => ({
      id,
      tenant_id: "t1",
      name: id,
      auth_type: "bearer",
      scopes,
      disabled: false,
      created_at: at,
      updated_at: at,
    });
    await knex("machine_users").insert([
      machine("weak", ""),
      machine("strong", "cluster:write"),
      machine("scopeless", ""),
    ]);
    const fpStrong = "a".repeat(64);
    const fpScopeless = "b".repeat(64);
    const binding = (
      id: string,
      machineUserId: string,
      fingerprint: string | null,
      sanUri: string | null,
    ) => ({
      id,
      machine_user_id: machineUserId,
      sha256_fingerprint: fingerprint,
      san_uri: sanUri,
      proven: false,
      created_at: at,
    });
    await knex("machine_user_certificates").insert([
      binding("b1", "weak", fpStrong, null),
      binding("b2", "strong", null, "spiffe://t1/strong"),
      binding("b3", "weak", fpScopeless, null),
      binding("b4", "scopeless", null, "spiffe://t1/scopeless"),
    ]);

    await storage.migrate();
    const b1 = await storage.em.fork().findOneOrFail(MachineUserCertificate, { id: "b1" });
    expect(b1.binderScopes ?? null).toBeNull();
    const machines = new MachineStateRepository(await createSqlRunner(storage, { stateCacheSize: 0 }));
    const rows = await machines.bindingsOf(fpStrong, ["spiffe://t1/strong"]);
    expect(rows.find((r) => r.bindingId === "b1")?.binderScopes).toEqual([]);
    // The strong machine user keeps its certificate; a scopeless one is outranked as before.
    expect(
      (await machineOfCertificate(machines, certificate(fpStrong, "spiffe://t1/strong")))?.machine.id,
    ).toBe("strong");
    expect(
      (await machineOfCertificate(machines, certificate(fpScopeless, "spiffe://t1/scopeless")))?.machine.id,
    ).toBe("weak");
    // Between SAN URI bindings alike: bound with no authority, the scopeless machine user's
    // binding cannot contest the strong one's, whose binding still contests the scopeless one.
    const both = certificate("c".repeat(64), "spiffe://t1/strong", "spiffe://t1/scopeless");
    expect((await machineOfCertificate(machines, both))?.machine.id).toBe("strong");

    await migrateTo(storage, "down", BEFORE);
    await expect(knex("machine_user_certificates").select("binder_scopes")).rejects.toThrow(/binder_scopes/);
    // The rows themselves survive the way down.
    expect((await knex("machine_user_certificates").select("id").orderBy("id")).map((r) => r.id)).toEqual([
      "b1",
      "b2",
      "b3",
      "b4",
    ]);
  });
});
