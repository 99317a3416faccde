import { SchemaMigration } from "./schema-migration.js";

/**
 * Sessions: one row per login (a refresh-token family; its id is the family id and the
 * `sid` claim of the access tokens issued to it). The authentication path reads
 * `revoked_at` together with the user's row, so an ended session's access tokens are
 * refused on the next request. Existing families get their row (revoked when any of
 * their refresh tokens is), so refreshing a session opened before this migration keeps
 * working and one already revoked stays ended.
 */
export class Migration20261204200000_sessions extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.createTable("sessions", (t) => {
        t.string("id", 36).primary();
        t.string("user_id", 36).notNullable().references("id").inTable("users").onDelete("CASCADE");
        t.datetime("created_at", { useTz: true }).notNullable();
        t.datetime("revoked_at", { useTz: true }).nullable();
        t.index(["user_id"], "sessions_user_id_index");
      }),
    );
    this.addSql(
      "insert into sessions (id, user_id, created_at, revoked_at) " +
        "select family_id, user_id, min(created_at), max(revoked_at) from refresh_tokens group by family_id, user_id",
    );
  }

  override async down(): Promise<void> {
    this.addSchema((schema) => schema.dropTableIfExists("sessions"));
  }
}
