import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { SchemaMigration } from "./schema-migration.js";

/**
 * The columns of `machine_users` whose update made a revocation event (SUBJECT) in
 * Migration20261205100000_revocation_events. Listed here: a shipped migration never changes.
 */
const BEFORE = [
  "disabled",
  "scopes",
  "tenant_id",
  "name",
  "auth_type",
  "rotated_at",
  "rotation_grace_until",
] as const;

/**
 * An update of `machine_users.tokens_revoked_before` (Migration20261207120000) makes a
 * revocation event, as one of the rotation cut-off's pair does: it ends machine access tokens,
 * so a cached verification answer must not outlive it. No writer sets it today without the
 * pair (a rotation writes the three together); a writer that did, or an operator's SQL, would
 * have ended tokens with no event, and the WatchRevocations clients would have kept their
 * answers until they expired.
 *
 * The update trigger of `machine_users` is made again with the column in its condition (same
 * name, same form as the revocation-events migration made it); down makes it as it was.
 * PostgreSQL runs the migration in one transaction, so no update meets the table without it.
 */
export class Migration20261207130000_revocation_tokens_revoked_before extends SchemaMigration {
  override async up(): Promise<void> {
    this.updateTrigger([...BEFORE, "tokens_revoked_before"]);
  }

  override async down(): Promise<void> {
    this.updateTrigger(BEFORE);
  }

  private updateTrigger(columns: readonly string[]): void {
    if (this.driver instanceof PostgreSqlDriver) {
      const when = columns.map((c) => `old.${c} is distinct from new.${c}`).join(" or ");
      this.addSql("drop trigger if exists tessera_revocation_update on machine_users");
      this.addSql(
        "create constraint trigger tessera_revocation_update after update on machine_users " +
          `deferrable initially deferred for each row when (${when}) execute function tessera_revocation_event()`,
      );
      this.addSql("alter table machine_users enable always trigger tessera_revocation_update");
      return;
    }
    const when = columns.map((c) => `old.${c} is not new.${c}`).join(" or ");
    // Milliseconds since the epoch, as the ORM stores datetimes on SQLite.
    const now = "cast((julianday('now') - 2440587.5) * 86400000 as integer)";
    this.addSql("drop trigger if exists tessera_revocation_machine_users_update");
    this.addSql(
      "create trigger tessera_revocation_machine_users_update after update on machine_users for each row " +
        `when (${when}) begin insert into revocation_events (kind, subject_id, tenant_id, occurred_at) ` +
        `select 'subject', new.id, new.tenant_id, ${now}; end`,
    );
  }
}
