import { SchemaMigration } from "./schema-migration.js";

/**
 * Indexes for pruning ended sessions (services/user/session-pruning.ts): revoked ones by
 * `revoked_at` through a partial index that holds only them; never-revoked ones walked by (`created_at`, `id`) through a partial index
 * that holds only them; and a session's live refresh tokens found by (`family_id`,
 * `expires_at`), which replaces the index on `family_id` alone that it covers. Without them
 * every batch scanned both tables (on SQLite, inside one turn of the event loop).
 */
export class Migration20261206060000_session_prune_indexes extends SchemaMigration {
  override async up(): Promise<void> {
    // Partial, each holding one kind only: with one plain index on revoked_at, SQLite's
    // planner (no statistics) walked it for `revoked_at is null` and sorted every open session.
    // The schema builder has no portable way to write a predicate; this SQL is the same on
    // SQLite and PostgreSQL.
    this.addSql(
      "create index sessions_revoked_at_index on sessions (revoked_at) where revoked_at is not null",
    );
    this.addSql(
      "create index sessions_open_created_at_id_index on sessions (created_at, id) where revoked_at is null",
    );
    this.addSchema((schema) =>
      schema.alterTable("refresh_tokens", (t) => {
        t.index(["family_id", "expires_at"], "refresh_tokens_family_id_expires_at_index");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("refresh_tokens", (t) => {
        t.dropIndex(["family_id"], "refresh_tokens_family_id_index");
      }),
    );
  }

  override async down(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("refresh_tokens", (t) => {
        t.index(["family_id"], "refresh_tokens_family_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("refresh_tokens", (t) => {
        t.dropIndex(["family_id", "expires_at"], "refresh_tokens_family_id_expires_at_index");
      }),
    );
    this.addSql("drop index sessions_open_created_at_id_index");
    this.addSql("drop index sessions_revoked_at_index");
  }
}
