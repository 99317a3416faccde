import { AsyncResource } from "node:async_hooks";
import type { Awaitable } from "../auth/awaitable.js";
import type { Storage } from "./orm.js";
import { INSERT_EXEMPT, NO_CACHE, RowBuckets, STATE_TABLES, type StateCacheStats } from "./row-cache.js";
import type { SqlRunner, SqlRunnerOptions } from "./sql.js";
import { HOLD_BOUND_MS, type SqlitePoolEvents, SqlitePoolQueue } from "./sqlite-pool-queue.js";
import { ownsOpenTransaction, SqliteReadGate } from "./sqlite-read-gate.js";
import { SqliteWriteGate } from "./sqlite-write-gate.js";

interface BetterSqliteStatement {
  get(...params: unknown[]): unknown;
  all(...params: unknown[]): unknown[];
  run(...params: unknown[]): { changes: number };
  pluck(on?: boolean): BetterSqliteStatement;
}
interface BetterSqliteDatabase {
  prepare(sql: string): BetterSqliteStatement;
  exec(sql: string): unknown;
  function(name: string, options: { deterministic?: boolean }, fn: () => unknown): unknown;
  readonly inTransaction: boolean;
  readonly open: boolean;
}

function sqliteParam(value: unknown): unknown {
  // better-sqlite3 binds numbers, strings, bigints, buffers and null only.
  if (value instanceof Date) return value.getTime();
  if (typeof value === "boolean") return value ? 1 : 0;
  return value === undefined ? null : value;
}

/**
 * The SQLite runner: prepared statements on the same connection MikroORM uses (its SQLite
 * pool holds exactly one), so an in-memory database is shared too. better-sqlite3 is
 * synchronous: a statement answers in the calling turn. Reads never see another request's
 * uncommitted writes ({@link SqliteReadGate}).
 */
export async function createSqliteRunner(
  storage: Storage,
  cacheSize: number,
  logger?: SqlRunnerOptions["logger"],
  now: () => number = Date.now,
): Promise<SqlRunner> {
  const client = storage.em.getConnection().getKnex().client;
  const db = (await client.acquireConnection()) as BetterSqliteDatabase;
  await client.releaseConnection(db);
  const statements = new Map<string, BetterSqliteStatement>();
  const prepare = (sql: string) => {
    let st = statements.get(sql);
    if (!st) {
      st = db.prepare(sql);
      statements.set(sql, st);
    }
    return st;
  };
  const get = <T>(sql: string, params: readonly unknown[]) =>
    prepare(sql).get(...params.map(sqliteParam)) as T | undefined;
  const all = <T>(sql: string, params: readonly unknown[]) =>
    prepare(sql).all(...params.map(sqliteParam)) as T[];
  const queue = new SqlitePoolQueue(client, client.pool as SqlitePoolEvents, {
    holdMs: HOLD_BOUND_MS,
    // As PostgreSQL's wait for a free pooled connection (database.connectTimeoutMs).
    maxWaitMs: storage.connectionWaitMs,
  });
  const reads = new SqliteReadGate(queue, db, logger, now);
  const writes = new SqliteWriteGate(queue, db, logger, now);
  const cache = cacheSize > 0 ? new StateCache(db, cacheSize) : null;
  // One boolean on the hot path: with no transaction open, the cache answers as it did.
  const cached = <T>(sql: string, params: readonly unknown[], load: () => T): Awaitable<T> => {
    if (!cache) return reads.gate(load);
    if (!db.inTransaction) return cache.read(sql, params, load);
    return ownsOpenTransaction() ? load() : reads.afterCommit(() => cache.read(sql, params, load));
  };
  return {
    async get<T>(sql: string, params: readonly unknown[] = []) {
      return reads.gate(() => get<T>(sql, params));
    },
    async all<T>(sql: string, params: readonly unknown[] = []) {
      return reads.gate(() => all<T>(sql, params));
    },
    async run(sql: string, params: readonly unknown[] = []) {
      // Not inside a transaction the ORM has open on this one connection (see SqliteWriteGate;
      // not exempt as the transaction's own, unlike reads: an audit flush started in a
      // request's context is not its write).
      return writes.run(() => prepare(sql).run(...params.map(sqliteParam)).changes);
    },
    rawWritesJoined: () => writes.joined(),
    cachedGet: <T>(sql: string, params: readonly unknown[]) => cached(sql, params, () => get<T>(sql, params)),
    cachedAll: <T>(sql: string, params: readonly unknown[]) => cached(sql, params, () => all<T>(sql, params)),
    cacheStats: () => ({
      ...(cache?.stats() ?? NO_CACHE),
      readsHeld: reads.held,
      readsRefused: reads.refused,
    }),
    inTransaction: () => db.inTransaction,
    flushReports() {
      reads.flush();
      writes.flush();
    },
    ...(cache ? { onStateChange: (fn: () => void) => cache.onChange(fn) } : {}),
    blocking: true,
  };
}

/**
 * Columns whose updates leave the state cache as it is: `last_used_at` (the coalesced
 * last-used flush; no cached statement reads it) and `verified_digest` (a shared digest of
 * a verified secret, auth/secret-cache.ts: a cached copy may be older, which can only send a
 * verification to the database or to PBKDF2, never accept a secret the row's hash does not
 * match). Emptying the cache on each would cost a whole cache per credential's first use.
 */
const QUIET_COLUMNS: readonly string[] = ["last_used_at", "verified_digest"];

/**
 * Authentication state read once and answered from memory until it may have changed: the
 * embedded (SQLite) deployment's answer to a per-request read that was a noticeable share
 * of a whole request's CPU under load (figures in commit 4825cdc).
 *
 * Changes made through Tessera are never served stale, and changes made behind its back
 * are seen within one turn of the event loop:
 * - writes through this process's connection (the ORM, native queries, raw SQL alike):
 *   connection-local TEMP triggers on every {@link STATE_TABLES} table call a function
 *   that drops the cache, synchronously, inside the writing statement;
 * - writes by any other connection or process (another `tessera`, the sqlite3 shell):
 *   `PRAGMA data_version`, which changes whenever another connection commits, is read
 *   before the first cached answer of every event-loop turn, i.e. before any request
 *   that turn's I/O brought in is answered from memory. (Once per turn rather than once
 *   per request: the statement is not free, and a turn serves many requests.)
 * - while this connection is inside a transaction, the cache is not asked: a read waits
 *   for it to end ({@link SqliteReadGate}), or, the transaction's own, reads the database
 *   and keeps nothing (its writes may be rolled back).
 * Any write to a watched table empties the whole cache, except an update that sets only
 * {@link QUIET_COLUMNS} (as PostgreSQL's triggers do): changes to who may authenticate are
 * rare next to reads.
 * Only rows found are kept (an insert can never be hidden by a remembered "no row"), and
 * every time-based rule (expiry, rotation grace) is still evaluated by the caller against
 * the clock on each request. Rows are frozen: callers share them.
 */
class StateCache {
  private readonly rows: RowBuckets;
  private readonly dataVersion: BetterSqliteStatement;
  private version: unknown;
  /** Whether data_version was read in the current event-loop turn (reset by setImmediate). */
  private checkedThisTurn = false;
  private readonly endTurn = () => {
    this.checkedThisTurn = false;
  };
  private readonly changeListeners: (() => void)[] = [];

  constructor(db: BetterSqliteDatabase, perStatement: number) {
    this.rows = new RowBuckets(perStatement);
    db.function("tessera_state_changed", { deterministic: false }, () => {
      this.invalidate();
      for (const fn of this.changeListeners) fn();
      return null;
    });
    for (const table of STATE_TABLES) {
      // `update of <columns>`: fires when the statement sets any column but the quiet ones.
      // Read once, after the migrations: this process's code writes no column added later.
      const columns = (db.prepare(`pragma main.table_info(${table})`).all() as { name: string }[]).map(
        (c) => c.name,
      );
      const loud = columns.filter((c) => !QUIET_COLUMNS.includes(c));
      const update =
        loud.length < columns.length ? `update of ${loud.map((c) => `"${c}"`).join(", ")}` : "update";
      for (const op of ["insert", update, "delete"]) {
        if (op === "insert" && INSERT_EXEMPT.has(table)) continue;
        const name = op.startsWith("update") ? "update" : op;
        db.exec(
          `create temp trigger if not exists tessera_state_${table}_${name} after ${op} on main.${table} ` +
            "begin select tessera_state_changed(); end",
        );
      }
    }
    this.dataVersion = db.prepare("pragma data_version").pluck();
    this.version = this.dataVersion.get();
  }

  /** The kept answer, or `load()` kept. Only with no transaction open on the connection (the runner checks). */
  read<T>(sql: string, params: readonly unknown[], load: () => T): T {
    if (!this.checkedThisTurn) {
      const version = this.dataVersion.get();
      if (version !== this.version) {
        this.version = version;
        this.invalidate();
      }
      this.checkedThisTurn = true;
      setImmediate(this.endTurn);
    }
    const hit = this.rows.get<T>(sql, params);
    if (hit !== undefined) return hit;
    this.rows.counters.misses++;
    const value = load();
    this.rows.set(sql, params, value);
    return value;
  }

  invalidate(): void {
    this.rows.clear();
  }

  /**
   * Be told of every write that empties the cache (see SqlRunner.onStateChange). Run in the
   * context it was registered in, not the writer's: work it defers (a timer, a promise) would
   * otherwise carry the writer's transaction context, and its reads pass the read gate as that
   * transaction's own, uncommitted rows and all.
   */
  onChange(fn: () => void): void {
    this.changeListeners.push(AsyncResource.bind(fn));
  }

  stats(): StateCacheStats {
    return { enabled: true, ...this.rows.counters };
  }
}
