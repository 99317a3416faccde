import { SchemaMigration } from "./schema-migration.js";

/**
 * Personal access tokens and API keys (one table, `kind` tells them apart).
 * `public_id` is unique: the verifier finds a presented token's row with one indexed
 * look-up. Deleting the owner (or its tenant) deletes its tokens.
 */
export class Migration20261123100000_tokens extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.createTable("api_tokens", (t) => {
        t.string("id", 36).primary();
        t.string("public_id", 16).notNullable();
        t.string("kind", 16).notNullable();
        t.string("tenant_id", 36).notNullable().references("id").inTable("tenants").onDelete("CASCADE");
        t.string("owner_user_id", 36).notNullable().references("id").inTable("users").onDelete("CASCADE");
        t.string("name", 100).notNullable();
        t.text("scopes").notNullable().defaultTo("");
        t.string("secret_hash", 255).notNullable();
        t.string("hint", 64).notNullable();
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("expires_at", { useTz: true }).nullable();
        t.datetime("last_used_at", { useTz: true }).nullable();
        t.datetime("revoked_at", { useTz: true }).nullable();
        t.unique(["public_id"], { indexName: "api_tokens_public_id_unique" });
        t.index(["owner_user_id"], "api_tokens_owner_user_id_index");
        t.index(["tenant_id"], "api_tokens_tenant_id_index");
      }),
    );
  }

  override async down(): Promise<void> {
    this.addSchema((schema) => schema.dropTableIfExists("api_tokens"));
  }
}
