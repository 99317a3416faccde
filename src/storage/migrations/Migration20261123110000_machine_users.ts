import type { Knex } from "@mikro-orm/knex";
import { SchemaMigration } from "./schema-migration.js";

/** A not-null column holding the id of a row of `table`, deleted with that row. */
function cascading(t: Knex.CreateTableBuilder, column: string, table: string): void {
  t.string(column, 36).notNullable().references("id").inTable(table).onDelete("CASCADE");
}

/**
 * Applications, machine users with their credentials, application assignments and
 * certificate bindings, and registered backends. Deleting a tenant, an application or a
 * machine user deletes what depends on it (ON DELETE CASCADE; SQLite enforces foreign
 * keys through MikroORM's `pragma foreign_keys = on`).
 */
export class Migration20261123110000_machine_users extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.createTable("applications", (t) => {
        t.string("id", 36).primary();
        cascading(t, "tenant_id", "tenants");
        t.string("name", 200).notNullable();
        t.datetime("created_at", { useTz: true }).notNullable();
        t.unique(["tenant_id", "name"], { indexName: "applications_tenant_id_name_unique" });
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("machine_users", (t) => {
        t.string("id", 36).primary();
        cascading(t, "tenant_id", "tenants");
        t.string("name", 200).notNullable();
        t.string("auth_type", 16).notNullable();
        t.text("scopes").notNullable().defaultTo("");
        t.boolean("disabled").notNullable().defaultTo(false);
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("updated_at", { useTz: true }).notNullable();
        t.datetime("last_used_at", { useTz: true }).nullable();
        t.datetime("rotated_at", { useTz: true }).nullable();
        t.datetime("rotation_grace_until", { useTz: true }).nullable();
        t.unique(["tenant_id", "name"], { indexName: "machine_users_tenant_id_name_unique" });
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("machine_credentials", (t) => {
        t.string("id", 36).primary();
        cascading(t, "machine_user_id", "machine_users");
        t.string("kind", 16).notNullable();
        t.string("public_id", 64).notNullable();
        t.string("secret_hash", 255).notNullable();
        t.string("hint", 64).notNullable().defaultTo("");
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("expires_at", { useTz: true }).nullable();
        t.datetime("last_used_at", { useTz: true }).nullable();
        t.unique(["public_id"], { indexName: "machine_credentials_public_id_unique" });
        t.index(["machine_user_id"], "machine_credentials_machine_user_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("machine_user_applications", (t) => {
        cascading(t, "machine_user_id", "machine_users");
        cascading(t, "application_id", "applications");
        t.primary(["machine_user_id", "application_id"]);
        t.index(["application_id"], "machine_user_applications_application_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("machine_user_certificates", (t) => {
        t.string("id", 36).primary();
        cascading(t, "machine_user_id", "machine_users");
        t.string("sha256_fingerprint", 64).nullable();
        t.string("san_uri", 2048).nullable();
        t.datetime("created_at", { useTz: true }).notNullable();
        t.unique(["sha256_fingerprint"], {
          indexName: "machine_user_certificates_sha256_fingerprint_unique",
        });
        t.unique(["san_uri"], { indexName: "machine_user_certificates_san_uri_unique" });
        t.index(["machine_user_id"], "machine_user_certificates_machine_user_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("backends", (t) => {
        t.string("id", 36).primary();
        cascading(t, "tenant_id", "tenants");
        cascading(t, "application_id", "applications");
        cascading(t, "machine_user_id", "machine_users");
        t.string("callback_url", 2048).notNullable();
        t.string("version", 64).notNullable().defaultTo("");
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("updated_at", { useTz: true }).notNullable();
        t.unique(["application_id", "callback_url"], {
          indexName: "backends_application_id_callback_url_unique",
        });
        t.index(["tenant_id"], "backends_tenant_id_index");
        t.index(["machine_user_id"], "backends_machine_user_id_index");
      }),
    );
  }

  override async down(): Promise<void> {
    for (const table of [
      "backends",
      "machine_user_certificates",
      "machine_user_applications",
      "machine_credentials",
      "machine_users",
      "applications",
    ]) {
      this.addSchema((schema) => schema.dropTableIfExists(table));
    }
  }
}
