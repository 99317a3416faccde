import { SchemaMigration } from "./schema-migration.js";

/**
 * Tenants, users, refresh tokens, signing keys and the audit log.
 * Written with knex's schema builder so one migration serves SQLite and PostgreSQL.
 */
export class Migration20261123000000_foundation extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.createTable("tenants", (t) => {
        t.string("id", 36).primary();
        t.string("name", 200).notNullable().unique();
        t.boolean("disabled").notNullable().defaultTo(false);
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("updated_at", { useTz: true }).notNullable();
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("users", (t) => {
        t.string("id", 36).primary();
        t.string("tenant_id", 36).notNullable().references("id").inTable("tenants").onDelete("CASCADE");
        t.string("username", 200).notNullable().unique();
        t.string("password_hash", 255).notNullable();
        t.text("scopes").notNullable().defaultTo("");
        t.boolean("disabled").notNullable().defaultTo(false);
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("updated_at", { useTz: true }).notNullable();
        t.index(["tenant_id"], "users_tenant_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("refresh_tokens", (t) => {
        t.string("id", 36).primary();
        t.string("family_id", 36).notNullable();
        t.string("user_id", 36).notNullable().references("id").inTable("users").onDelete("CASCADE");
        t.string("token_hash", 64).notNullable().unique();
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("expires_at", { useTz: true }).notNullable();
        t.datetime("spent_at", { useTz: true }).nullable();
        t.datetime("revoked_at", { useTz: true }).nullable();
        t.index(["family_id"], "refresh_tokens_family_id_index");
        t.index(["user_id"], "refresh_tokens_user_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("signing_keys", (t) => {
        t.string("kid", 64).primary();
        t.string("alg", 16).notNullable();
        t.text("private_jwk").notNullable();
        t.text("public_jwk").notNullable();
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("retired_at", { useTz: true }).nullable();
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("audit_events", (t) => {
        t.string("id", 36).primary();
        t.datetime("at", { useTz: true }).notNullable();
        t.string("request_id", 64).notNullable();
        t.string("tenant_id", 36).nullable();
        t.string("actor_kind", 32).notNullable();
        t.string("actor_id", 64).nullable();
        t.string("action", 128).notNullable();
        t.string("target_id", 64).nullable();
        t.string("outcome", 32).notNullable();
        t.string("reason", 64).nullable();
        t.string("ip", 64).nullable();
        t.index(["at"], "audit_events_at_index");
        t.index(["tenant_id"], "audit_events_tenant_id_index");
      }),
    );
  }

  override async down(): Promise<void> {
    for (const table of ["audit_events", "signing_keys", "refresh_tokens", "users", "tenants"]) {
      this.addSchema((schema) => schema.dropTableIfExists(table));
    }
  }
}
