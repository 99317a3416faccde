import { BetterSqliteKnexDialect } from "@mikro-orm/knex";

/** The members of knex's SQLite transaction (`Transaction_Sqlite`) that {@link ImmediateBetterSqliteDialect} uses. */
interface KnexSqliteTransaction {
  /** `em.transactional(fn, { readOnly: true })`. */
  readonly readOnly?: boolean;
  /** knex's "no statement may run on it any more" flag, which its own BEGIN sets on a failure. */
  _completed: boolean;
  /** The client bound to the transaction's connection. */
  readonly trxClient: { query(conn: unknown, sql: string): Promise<unknown> };
  begin(conn: unknown): Promise<unknown>;
}

/** The statement that opens a top-level ORM transaction on SQLite. */
export function sqliteBeginStatement(readOnly: boolean | undefined): string {
  return readOnly ? "BEGIN DEFERRED;" : "BEGIN IMMEDIATE;";
}

/**
 * MikroORM's better-sqlite3 knex dialect, whose ORM transactions take SQLite's write lock at
 * their BEGIN (`BEGIN IMMEDIATE`) rather than at their first write; read-only ones
 * (`readOnly: true`) stay deferred. Given to knex as `driverOptions.client`.
 *
 * Why: a deferred transaction that reads before it writes (DeleteApplication reads what it
 * affects, then deletes) holds a WAL snapshot, and its first write must upgrade it. If another
 * connection to the file (the CLI, a second Tessera, the checkpoint thread's RESTART) holds
 * the write lock at that moment, or has committed since the snapshot, SQLite fails the write
 * at once with SQLITE_BUSY (or SQLITE_BUSY_SNAPSHOT) without asking the busy handler (waiting
 * could deadlock, and the snapshot could not be kept): the call was answered 503 for a lock
 * released within milliseconds. At BEGIN no snapshot is held yet, so the busy timeout applies
 * there (SQLITE_BUSY_TIMEOUT_MS, on the event loop's thread, the same bound as any write's),
 * and once BEGIN IMMEDIATE succeeds no statement of the transaction meets SQLITE_BUSY.
 * Nothing changes within the process: its one connection runs one transaction at a time.
 *
 * Neither knex (its SQLite `begin` sends a bare `BEGIN;`) nor MikroORM 6 (it passes knex only
 * `isolationLevel` and `readOnly`) offers a choice of the statement; hence this override of
 * the transaction's `begin`. Nested transactions (savepoints) do not call it.
 *
 * A failed BEGIN also rejects the transaction with its own error (SQLITE_BUSY: Unavailable
 * with Retry-After, and a lock contention a migration retries): knex's own `begin` swallows it,
 * marks the transaction complete and still hands it to the ORM, whose first statement then
 * fails with "Transaction query already complete".
 */
export class ImmediateBetterSqliteDialect extends BetterSqliteKnexDialect {
  // Not `override`: the base class is typed `any` (MikroORM's MonkeyPatchable).
  transaction(...args: unknown[]): KnexSqliteTransaction {
    const trx = super.transaction(...args) as KnexSqliteTransaction;
    trx.begin = (conn) =>
      trx.trxClient.query(conn, sqliteBeginStatement(trx.readOnly)).catch((err: unknown) => {
        trx._completed = true;
        throw err;
      });
    return trx;
  }
}
