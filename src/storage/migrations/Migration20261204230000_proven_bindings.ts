import { SchemaMigration } from "./schema-migration.js";

/**
 * `proven` on certificate bindings: set when the binding was made over a TLS connection
 * presenting the very certificate it binds (proof of possession). A proven binding
 * displaces an unproven one of the same identity in another tenant, is never displaced
 * itself, and decides which machine user a certificate matching it authenticates as
 * (MachineStateReader.byCertificate). Every existing binding was made without proof.
 */
export class Migration20261204230000_proven_bindings extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("machine_user_certificates", (t) => {
        t.boolean("proven").notNullable().defaultTo(false);
      }),
    );
  }

  override async down(): Promise<void> {
    // Plain SQL: knex's SQLite dropColumn rebuilds the table with queries of its own at run
    // time, which a compiled migration does not carry (it compiled to nothing that drops
    // the column); SQLite has had ALTER TABLE … DROP COLUMN since 3.35, PostgreSQL always.
    this.addSql("alter table machine_user_certificates drop column proven");
  }
}
