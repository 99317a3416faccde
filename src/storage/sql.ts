import type { EntityManager } from "@mikro-orm/knex";
import type { Awaitable } from "../auth/awaitable.js";
import { parseScopeString } from "../auth/scopes.js";
import type { Storage } from "./orm.js";
import type { PgNotifier } from "./pg-notify.js";
import { PgStateCache } from "./pg-state.js";
import { ANNOUNCED_TABLES, stateChannel, TRIGGERED_TABLES_SQL } from "./pg-state-channel.js";
import { installWriteHook } from "./pg-write-hook.js";
import { INSERT_EXEMPT, RowBuckets, STATE_TABLES, type StateCacheStats } from "./row-cache.js";
import { SqliteWriteGate } from "./sqlite-write-gate.js";

/**
 * Raw, parameterised SQL for the per-request authentication path.
 *
 * Why not the ORM there: an `em.fork()` plus `findOne` per request costs many times what
 * a prepared statement does, on the path every call takes (figures in commit 1706656).
 * Every request sees the credential's current row state (revocation, expiry, disabled
 * owner or tenant take effect on the very next request): read per request on PostgreSQL,
 * and on SQLite from a cache that every change empties first (see StateCache).
 * SQL here must be portable between SQLite and PostgreSQL (`?` placeholders).
 */
export interface SqlRunner {
  get<T>(sql: string, params?: readonly unknown[]): Promise<T | undefined>;
  all<T>(sql: string, params?: readonly unknown[]): Promise<T[]>;
  /** Run a write; returns the number of rows changed. */
  run(sql: string, params?: readonly unknown[]): Promise<number>;
  /**
   * Like {@link get}, for the authentication path's state reads: answered from memory while
   * no table in {@link STATE_TABLES} has changed since the row was read (see
   * {@link StateCache}, {@link PgStateCache}). The one synchronous source of the
   * authentication path: a kept row is returned as it is, without a promise; a miss is a
   * promise on PostgreSQL and, on SQLite, whose driver reads in the calling turn, the row
   * read now. A plain read where no cache guarantee exists (PostgreSQL without a listener).
   */
  cachedGet<T>(sql: string, params: readonly unknown[]): Awaitable<T | undefined>;
  /** Like {@link all}, cached and answered under the same rules as {@link cachedGet}. */
  cachedAll<T>(sql: string, params: readonly unknown[]): Awaitable<T[]>;
  /** Counters of the state cache (all zero when there is none). */
  cacheStats(): StateCacheStats;
  /**
   * SQLite: whether the one connection (shared with the ORM) is inside a transaction, whose
   * uncommitted writes a read now would see. Absent on PostgreSQL (a pool: reads never do).
   */
  inTransaction?(): boolean;
  /**
   * SQLite: raw writes that ran inside another's open transaction, having waited for it past
   * their bound (see SqliteWriteGate). Absent on PostgreSQL (each write takes its own connection).
   */
  rawWritesJoined?(): number;
  /**
   * SQLite: the driver answers every statement in the calling turn, blocking the event loop
   * while it runs (callers that write in bulk keep their batches small). Absent on PostgreSQL.
   */
  readonly blocking?: true;
  /**
   * SQLite with a state cache: `fn` is called on every write to a {@link STATE_TABLES} table
   * that empties the cache (the writing statement's own trigger calls it, synchronously, inside
   * that statement and maybe inside a transaction not yet committed: defer any read). Absent
   * on PostgreSQL, where a NOTIFY announces commits, and without a state cache.
   */
  onStateChange?(fn: () => void): void;
}

export { STATE_TABLES, type StateCacheStats } from "./row-cache.js";

/** Options of {@link createSqlRunner}. */
export interface SqlRunnerOptions {
  /** Entries per cached statement; 0 turns the state cache off (default 10,000). */
  stateCacheSize?: number;
  /**
   * PostgreSQL: this instance's listening session ({@link createStateNotifier}), not yet
   * started (the state channel is subscribed here, before it LISTENs). With it, state
   * reads are cached (see {@link PgStateCache}) and every write to state waits for its
   * barrier; without it, state is read on every request.
   */
  notifier?: PgNotifier;
  /** PostgreSQL: bound of a write's barrier (default 1,000 ms, see {@link PgStateCache.barrier}). */
  barrierTimeoutMs?: number;
  /** PostgreSQL: where the cache reports a barrier past its bound and missing triggers. */
  logger?: {
    info(obj: object, msg: string): void;
    warn(obj: object, msg: string): void;
    error(obj: object, msg: string): void;
  };
}

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

/** Build the runner for a storage: prepared statements on SQLite, the pool on PostgreSQL. */
export async function createSqlRunner(storage: Storage, options: SqlRunnerOptions = {}): Promise<SqlRunner> {
  const cacheSize = options.stateCacheSize ?? 10_000;
  if (storage.target.kind === "sqlite") {
    // The same connection MikroORM uses (its SQLite pool holds exactly one), so an
    // in-memory database is shared too. better-sqlite3 is synchronous: no interleaving.
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
    const cache = cacheSize > 0 ? new StateCache(db, cacheSize) : null;
    const gate = new SqliteWriteGate(client, db, options.logger);
    const cachedGet = <T>(sql: string, params: readonly unknown[]) =>
      cache ? cache.read(sql, params, () => get<T>(sql, params)) : get<T>(sql, params);
    const cachedAll = <T>(sql: string, params: readonly unknown[]) =>
      cache ? cache.read(sql, params, () => all<T>(sql, params)) : all<T>(sql, params);
    return {
      async get<T>(sql: string, params: readonly unknown[] = []) {
        return get<T>(sql, params);
      },
      async all<T>(sql: string, params: readonly unknown[] = []) {
        return all<T>(sql, params);
      },
      async run(sql: string, params: readonly unknown[] = []) {
        // Not inside a transaction the ORM has open on this one connection (see SqliteWriteGate).
        return gate.run(() => prepare(sql).run(...params.map(sqliteParam)).changes);
      },
      rawWritesJoined: () => gate.joined(),
      cachedGet,
      cachedAll,
      cacheStats: () => cache?.stats() ?? { ...NO_CACHE },
      inTransaction: () => db.inTransaction,
      ...(cache ? { onStateChange: (fn: () => void) => cache.onChange(fn) } : {}),
      blocking: true,
    };
  }
  const em: EntityManager = storage.em;
  const conn = em.getConnection();
  const get = async <T>(sql: string, params: readonly unknown[] = []) => {
    const rows = (await conn.execute(sql, [...params], "all")) as T[];
    return rows[0];
  };
  const all = async <T>(sql: string, params: readonly unknown[] = []) =>
    (await conn.execute(sql, [...params], "all")) as T[];
  const notifier = options.notifier;
  // Without a listener, another instance's write could not be learnt of: read per request.
  let cache: PgStateCache | null = null;
  if (notifier) {
    const schema = (await get<{ s: string }>("select current_schema() as s"))?.s ?? "public";
    const name = notifier.applicationName ?? "";
    const pidList = (pids: number[]) => pids.map((p) => String(Math.trunc(p))).join(", ");
    cache = new PgStateCache(notifier, {
      perStatement: cacheSize,
      channel: stateChannel(schema),
      ...(options.barrierTimeoutMs !== undefined ? { barrierTimeoutMs: options.barrierTimeoutMs } : {}),
      ...(options.logger ? { logger: options.logger } : {}),
      async notify(channel, payload) {
        await conn.execute("select pg_notify(?, ?)", [channel, payload], "all");
      },
      async peers(ownPid) {
        const rows = await all<{ pid: number }>(
          "select pid from pg_stat_activity where datname = current_database() and application_name = ? and pid <> ?",
          [name, ownPid],
        );
        return rows.map((r) => Number(r.pid));
      },
      async alive(pids) {
        if (pids.length === 0) return [];
        const rows = await all<{ pid: number }>(
          `select pid from pg_stat_activity where pid in (${pidList(pids)}) and application_name = ?`,
          [name],
        );
        return rows.map((r) => Number(r.pid));
      },
      async missingTriggers() {
        const rows = await all<{ t: string }>(TRIGGERED_TABLES_SQL, [ANNOUNCED_TABLES.join(",")]);
        const present = new Set(rows.map((r) => r.t));
        return ANNOUNCED_TABLES.filter((t) => !present.has(t));
      },
      async terminate(pids) {
        if (pids.length === 0) return;
        await all(
          `select pg_terminate_backend(pid) from pg_stat_activity where pid in (${pidList(pids)}) and application_name = ?`,
          [name],
        );
      },
    });
    // Before serving (the cache is off until a check finds every trigger).
    await cache.checkTriggers();
    const barrierCache = cache;
    installWriteHook(conn as unknown as Parameters<typeof installWriteHook>[0], () => barrierCache.barrier());
  }
  return {
    get,
    all,
    async run(sql: string, params: readonly unknown[] = []) {
      const res = (await conn.execute(sql, [...params], "run")) as { affectedRows?: number };
      return res.affectedRows ?? 0;
    },
    cachedGet: cache
      ? <T>(sql: string, params: readonly unknown[]) => cache.read(sql, params, () => get<T>(sql, params))
      : get,
    cachedAll: cache
      ? <T>(sql: string, params: readonly unknown[]) => cache.read(sql, params, () => all<T>(sql, params))
      : all,
    cacheStats: () => cache?.stats() ?? { ...NO_CACHE },
  };
}

const NO_CACHE: StateCacheStats = { enabled: false, hits: 0, misses: 0, invalidations: 0 };

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
 * - while this connection is inside a transaction, reads bypass the cache and store
 *   nothing (they could see writes that are then rolled back).
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

  constructor(
    private readonly db: BetterSqliteDatabase,
    perStatement: number,
  ) {
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

  read<T>(sql: string, params: readonly unknown[], load: () => T): T {
    if (this.db.inTransaction) return load();
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

  /** Be told of every write that empties the cache (see SqlRunner.onStateChange). */
  onChange(fn: () => void): void {
    this.changeListeners.push(fn);
  }

  stats(): StateCacheStats {
    return { enabled: true, ...this.rows.counters };
  }
}

/** A scopes column (space-separated) as a frozen list: every request authenticated by the same row shares it. */
export function toScopes(value: string): string[] {
  return Object.freeze(parseScopeString(value)) as string[];
}

/** A boolean column as either driver returns it (SQLite 0/1, PostgreSQL true/false). */
export function toBool(value: unknown): boolean {
  return value === true || value === 1 || value === "1" || value === "t" || value === "true";
}

/**
 * A timestamp column as epoch milliseconds: SQLite stores numbers; PostgreSQL returns
 * strings like "2026-11-23 12:21:47.287+00" through MikroORM's raw path.
 */
export function toMillis(value: unknown): number | null {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return value;
  if (typeof value === "bigint") return Number(value);
  if (value instanceof Date) return value.getTime();
  if (typeof value === "string") {
    if (/^\d+$/.test(value)) return Number(value);
    const iso = value.replace(" ", "T").replace(/([+-]\d\d)$/, "$1:00");
    const ms = Date.parse(iso);
    return Number.isNaN(ms) ? null : ms;
  }
  return null;
}
