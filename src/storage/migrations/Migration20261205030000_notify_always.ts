import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { NOTIFY_TABLES } from "./Migration20261204230000_state_notify.js";
import { SchemaMigration } from "./schema-migration.js";

/**
 * PostgreSQL: the state triggers fire in every session, and TRUNCATE is announced too, on the
 * tables of Migration20261204230000_state_notify (its list, shipped with it, never changes).
 *
 * - `ENABLE ALWAYS`: an ordinary trigger does not fire for a writer whose
 *   `session_replication_role` is `replica` (logical-replication apply, some bulk loaders),
 *   so such a write would leave every instance's state cache stale. The start-up and
 *   periodic check (pg-state.ts) accepts only always-enabled triggers.
 * - TRUNCATE fires no row trigger: a statement-level trigger on each table announces it.
 */
export class Migration20261205030000_notify_always extends SchemaMigration {
  override async up(): Promise<void> {
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    for (const table of NOTIFY_TABLES) {
      this.addSql(`alter table ${table} enable always trigger tessera_state_notify`);
      this.addSql(
        `create trigger tessera_state_notify_truncate after truncate on ${table} ` +
          "for each statement execute function tessera_state_notify()",
      );
      this.addSql(`alter table ${table} enable always trigger tessera_state_notify_truncate`);
    }
  }

  override async down(): Promise<void> {
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    for (const table of NOTIFY_TABLES) {
      this.addSql(`drop trigger if exists tessera_state_notify_truncate on ${table}`);
      this.addSql(`alter table ${table} enable trigger tessera_state_notify`);
    }
  }
}
