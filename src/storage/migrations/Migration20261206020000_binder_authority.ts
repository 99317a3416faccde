import { SchemaMigration } from "./schema-migration.js";

/**
 * `binder_scopes` on certificate bindings: the effective scopes of the caller that made the
 * binding, space-separated, as they were at bind time. Within a tenant an unproven
 * fingerprint binding outranks a SAN URI binding of another machine user only when these
 * cover that machine user's current scopes (machineOfCertificate), so a fingerprint bound
 * before a stronger machine user's SAN URI binding existed cannot take its certificate.
 *
 * Existing rows stay NULL: who bound them is not recorded, so they are read as bound with no
 * authority (they outrank the SAN URI bindings of scopeless machine users only). Reading
 * them as bound by `*` would keep every takeover already made through the gap in force;
 * the cost is that a fingerprint an administrator singled out before the upgrade, over a
 * SAN URI binding of a machine user holding scopes, yields to that binding until it is
 * bound again (unbind and bind, or bind it with proof).
 */
export class Migration20261206020000_binder_authority extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("machine_user_certificates", (t) => {
        t.text("binder_scopes").nullable();
      }),
    );
  }

  override async down(): Promise<void> {
    // Plain SQL, as in the proven_bindings migration (knex's SQLite dropColumn rebuilds the
    // table with queries of its own that a compiled migration does not carry).
    this.addSql("alter table machine_user_certificates drop column binder_scopes");
  }
}
