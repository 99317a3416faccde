import { SchemaMigration } from "./schema-migration.js";

/**
 * Signing keys shared by several instances get a schedule and a sequence number:
 *
 * - `activates_at`: when the key starts signing. A rotated key is written (and published
 *   in the JWKS of every instance) a pre-publication period before it signs anything, so
 *   every instance and every relying party knows it first. Existing keys signed from their
 *   creation: backfilled with `created_at`.
 * - `generation`: 1, 2, 3… in creation order, unique. The instance that rotates inserts
 *   `generation = newest + 1`; instances rotating at the same moment collide on the unique
 *   index and all but one give up, so a rotation period gets exactly one key on SQLite and
 *   PostgreSQL alike, without a lock. Existing keys are numbered by `created_at` (then
 *   `kid`), with a correlated count both databases run.
 *
 * Both columns stay nullable in the table (SQLite cannot add a NOT NULL column without a
 * default to a table that has rows); the service always writes them.
 */
export class Migration20261204230000_signing_key_schedule extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("signing_keys", (t) => {
        t.datetime("activates_at", { useTz: true }).nullable();
        t.integer("generation").nullable();
      }),
    );
    this.addSql("update signing_keys set activates_at = created_at");
    this.addSql(
      "update signing_keys set generation = (select count(*) from signing_keys older where older.created_at < signing_keys.created_at or (older.created_at = signing_keys.created_at and older.kid <= signing_keys.kid))",
    );
    this.addSchema((schema) =>
      schema.alterTable("signing_keys", (t) => {
        t.unique(["generation"], { indexName: "signing_keys_generation_unique" });
      }),
    );
  }

  override async down(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("signing_keys", (t) => {
        t.dropUnique(["generation"], "signing_keys_generation_unique");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("signing_keys", (t) => {
        t.dropColumn("generation");
        t.dropColumn("activates_at");
      }),
    );
  }
}
