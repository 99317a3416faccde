import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { SchemaMigration } from "./schema-migration.js";

/**
 * Tables whose changes are announced on PostgreSQL (see src/storage/state-sync.ts): the
 * authentication state (STATE_TABLES of sql.ts) and the signing keys (for the key work of
 * other instances). Listed here rather than imported: a shipped migration must not change
 * when the code around it does (Migration20261205030000_notify_always reads this list).
 */
export const NOTIFY_TABLES: readonly string[] = [
  "users",
  "tenants",
  "sessions",
  "api_tokens",
  "machine_users",
  "machine_credentials",
  "machine_user_applications",
  "machine_user_certificates",
  "signing_keys",
];

/**
 * PostgreSQL only (SQLite watches its tables with connection-local TEMP triggers instead):
 * every committed change to a state table sends `NOTIFY tessera_state_<md5 of schema>` with
 * the table name as payload. A trigger covers every write (the ORM, raw SQL, psql), and a
 * NOTIFY is delivered only when its transaction commits, so a rolled-back write announces
 * nothing. The channel is per schema (LISTEN is per database, and schemas share one);
 * md5 keeps it within the 63-byte identifier limit for any schema name.
 *
 * Not announced: inserts into `sessions` (every login makes one; the state cache keeps
 * only rows found, and the one statement reading sessions inner-joins it, so a new session
 * can make no kept answer stale, as on SQLite) and updates that change nothing but
 * `last_used_at` (the coalesced last-used flush; no cached statement reads that column).
 */
export class Migration20261204230000_state_notify extends SchemaMigration {
  override async up(): Promise<void> {
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    this.addSql(
      "create or replace function tessera_state_notify() returns trigger language plpgsql as $$ " +
        "begin " +
        "if tg_op = 'UPDATE' and (to_jsonb(old) - 'last_used_at') = (to_jsonb(new) - 'last_used_at') then return null; end if; " +
        "perform pg_notify('tessera_state_' || md5(tg_table_schema), tg_table_name); " +
        "return null; " +
        "end $$",
    );
    for (const table of NOTIFY_TABLES) {
      const ops = table === "sessions" ? "update or delete" : "insert or update or delete";
      this.addSql(
        `create trigger tessera_state_notify after ${ops} on ${table} ` +
          "for each row execute function tessera_state_notify()",
      );
    }
  }

  override async down(): Promise<void> {
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    for (const table of NOTIFY_TABLES) this.addSql(`drop trigger if exists tessera_state_notify on ${table}`);
    this.addSql("drop function if exists tessera_state_notify()");
  }
}
