import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { SchemaMigration } from "./schema-migration.js";

/**
 * `verified_digest` beside the secret hash of personal access tokens, API keys and machine
 * credentials: the keyed digest an instance stores once PBKDF2 verified a presented secret,
 * so that every other instance (and this one after a restart, or once its in-process cache
 * evicted the entry) recognises the secret with one HMAC (see src/auth/secret-cache.ts).
 * It is `HMAC(K, credential, stored hash, secret)` with K derived from the master key, which
 * lives only in the instances' configuration: a dump of the table cannot test guesses.
 *
 * PostgreSQL: the state trigger function no longer announces an update that changes nothing
 * but `last_used_at` and `verified_digest`. Storing a digest must not empty every
 * instance's state cache (a working set of a million tokens would keep them empty), and it
 * need not: a digest is only ever a proof about the stored hash it was computed with, so a
 * stale copy in a cache can make an instance hash again, never accept a secret the row's
 * current hash does not match. Every other change is announced as before.
 */
export class Migration20261205010000_verified_digests extends SchemaMigration {
  override async up(): Promise<void> {
    for (const table of ["api_tokens", "machine_credentials"])
      this.addSchema((schema) =>
        schema.alterTable(table, (t) => {
          t.string("verified_digest", 64).nullable();
        }),
      );
    if (!(this.driver instanceof PostgreSqlDriver)) return;
    this.addSql(notifyFunction(["last_used_at", "verified_digest"]));
  }

  override async down(): Promise<void> {
    if (this.driver instanceof PostgreSqlDriver) this.addSql(notifyFunction(["last_used_at"]));
    for (const table of ["api_tokens", "machine_credentials"])
      this.addSchema((schema) =>
        schema.alterTable(table, (t) => {
          t.dropColumn("verified_digest");
        }),
      );
  }
}

/** Migration20261204230000_state_notify's trigger function, ignoring updates of `quiet` columns only. */
function notifyFunction(quiet: string[]): string {
  const minus = quiet.map((c) => ` - '${c}'`).join("");
  return (
    "create or replace function tessera_state_notify() returns trigger language plpgsql as $$ " +
    "begin " +
    `if tg_op = 'UPDATE' and (to_jsonb(old)${minus}) = (to_jsonb(new)${minus}) then return null; end if; ` +
    "perform pg_notify('tessera_state_' || md5(tg_table_schema), tg_table_name); " +
    "return null; " +
    "end $$"
  );
}
