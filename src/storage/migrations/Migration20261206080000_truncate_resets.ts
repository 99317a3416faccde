import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { SchemaMigration } from "./schema-migration.js";

/** The tables Migration20261205100000_revocation_events watches (listed here: a shipped migration never changes). */
const WATCHED = [
  "tenants",
  "users",
  "machine_users",
  "api_tokens",
  "machine_credentials",
  "machine_user_applications",
  "machine_user_certificates",
  "sessions",
];

/**
 * PostgreSQL: a TRUNCATE of a watched table (which fires no row trigger) commits a `reset`
 * event, and raises the feed's `pruned_through` to it, so that every WatchRevocations stream
 * answers `reset` (its client empties its cache) and no cursor from before it resumes.
 * SQLite has no TRUNCATE (a `delete` without `where` fires the row triggers).
 *
 * Commit order as in that migration: the statement-level trigger after TRUNCATE only queues
 * a row in `revocation_truncations`, whose deferred constraint trigger, at COMMIT, takes the
 * same advisory lock first and then writes the event (so its id is drawn in commit order,
 * and the lock is never held from the TRUNCATE to the commit); it also updates the feed's
 * one row, which nothing else holds while waiting for that lock (retention's mark is one
 * statement). A TRUNCATE rolled back queues nothing. Enabled ALWAYS, like the event triggers.
 */
export class Migration20261206080000_truncate_resets extends SchemaMigration {
  override async up(): Promise<void> {
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    this.addSql(
      "create table revocation_truncations (id bigserial primary key, table_name varchar(63) not null)",
    );
    this.addSql(
      "create or replace function tessera_revocation_truncate() returns trigger language plpgsql as $$ " +
        "begin insert into revocation_truncations (table_name) values (tg_table_name); return null; end $$",
    );
    this.addSql(
      "create or replace function tessera_revocation_reset() returns trigger language plpgsql as $$ " +
        "declare i bigint; " +
        "begin " +
        "perform pg_advisory_xact_lock(hashtext(tg_table_schema || '.revocation_events')); " +
        "insert into revocation_events (kind, subject_id, tenant_id, occurred_at) " +
        "values ('reset', new.table_name, '*', clock_timestamp()) returning id into i; " +
        "update revocation_feed set pruned_through = i where id = 1 and pruned_through < i; " +
        "delete from revocation_truncations where id = new.id; " +
        "return null; " +
        "end $$",
    );
    this.addSql(
      "create constraint trigger tessera_revocation_reset after insert on revocation_truncations " +
        "deferrable initially deferred for each row execute function tessera_revocation_reset()",
    );
    this.addSql("alter table revocation_truncations enable always trigger tessera_revocation_reset");
    for (const table of WATCHED) {
      this.addSql(
        `create trigger tessera_revocation_truncate after truncate on ${table} ` +
          "for each statement execute function tessera_revocation_truncate()",
      );
      this.addSql(`alter table ${table} enable always trigger tessera_revocation_truncate`);
    }
  }

  override async down(): Promise<void> {
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    for (const table of WATCHED)
      this.addSql(`drop trigger if exists tessera_revocation_truncate on ${table}`);
    this.addSql("drop table if exists revocation_truncations");
    this.addSql("drop function if exists tessera_revocation_reset()");
    this.addSql("drop function if exists tessera_revocation_truncate()");
  }
}
