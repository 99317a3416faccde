import { SchemaMigration } from "./schema-migration.js";

/**
 * `made_with_token_id` on personal access tokens and API keys: the token (of the same table)
 * a token was made with, when it was made with one. Revoking a token revokes the tokens made
 * with it, and theirs: else a stolen token is laundered into one its revocation leaves
 * standing. Not a foreign key: a revoked token's row may be deleted while its descendants'
 * revocations stand. Existing rows stay NULL (what made them is not recorded).
 */
export class Migration20261206050000_token_lineage extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("api_tokens", (t) => {
        t.string("made_with_token_id", 36).nullable();
        t.index(["made_with_token_id"], "api_tokens_made_with_token_id_index");
      }),
    );
  }

  override async down(): Promise<void> {
    // Plain SQL, as in the proven_bindings migration (knex's SQLite dropColumn rebuilds the table).
    this.addSql("drop index if exists api_tokens_made_with_token_id_index");
    this.addSql("alter table api_tokens drop column made_with_token_id");
  }
}
