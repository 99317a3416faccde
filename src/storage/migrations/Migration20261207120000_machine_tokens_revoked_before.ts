import { SchemaMigration } from "./schema-migration.js";

/**
 * `tokens_revoked_before` on machine users: machine access tokens issued up to this instant
 * (their `iat`'s second) are refused for good. The rotation cut-off (`rotated_at`,
 * `rotation_grace_until`) is one pair, so a rotation that replaces a cut-off already in
 * force (a revocation's, or an earlier rotation's whose grace period is over) keeps it here;
 * before, the pair alone was replaced once the access-token lifetime configured on the
 * rotating instance had passed since it, which brought back the tokens it had ended when
 * they were issued with a longer lifetime (a lowered `auth.jwt.accessTokenTtl`, or another
 * instance's). Existing rows stay NULL: nothing more is refused than before.
 */
export class Migration20261207120000_machine_tokens_revoked_before extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("machine_users", (t) => {
        t.datetime("tokens_revoked_before", { useTz: true }).nullable();
      }),
    );
  }

  override async down(): Promise<void> {
    // Plain SQL, as in the binder_authority migration (knex's SQLite dropColumn rebuilds the table).
    this.addSql("alter table machine_users drop column tokens_revoked_before");
  }
}
