import type { EntityManager } from "@mikro-orm/knex";
import { LRUCache } from "lru-cache";
import type { Storage } from "./orm.js";

/**
 * Raw, parameterised SQL for the per-request authentication path.
 *
 * Why not the ORM there: an `em.fork()` plus `findOne` per request cut throughput to
 * about a third in a prototype, while a prepared better-sqlite3 statement costs ~7 µs.
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
   * {@link StateCache}); a plain read where no such guarantee exists (PostgreSQL).
   */
  cachedGet<T>(sql: string, params: readonly unknown[]): Promise<T | undefined>;
  /** Like {@link all}, cached under the same rules as {@link cachedGet}. */
  cachedAll<T>(sql: string, params: readonly unknown[]): Promise<T[]>;
  /** Counters of the state cache (all zero when there is none). */
  cacheStats(): StateCacheStats;
  /**
   * The same reads, synchronous, where the driver is (SQLite: better-sqlite3 answers in
   * the calling turn, so the async methods above only wrap these in a promise). Absent
   * on PostgreSQL.
   */
  readonly sync?: {
    cachedGet<T>(sql: string, params: readonly unknown[]): T | undefined;
    cachedAll<T>(sql: string, params: readonly unknown[]): T[];
  };
}

/** What the state cache did since start. */
export interface StateCacheStats {
  enabled: boolean;
  hits: number;
  misses: number;
  /** Times the whole cache was dropped because a watched table changed. */
  invalidations: number;
}

/**
 * Tables whose rows decide who may authenticate: users, tenants, user sessions, tokens,
 * machine users with their credentials, applications and certificate bindings. A statement read through
 * {@link SqlRunner.cachedGet} may only read these (checked on its first use), because only
 * changes to these tables invalidate the cache.
 */
export const STATE_TABLES = [
  "users",
  "tenants",
  "sessions",
  "api_tokens",
  "machine_users",
  "machine_credentials",
  "machine_user_applications",
  "machine_user_certificates",
] as const;

/**
 * Watched tables whose inserts do not empty the state cache. Every login inserts a
 * session, and emptying the whole cache on each would make it useless under login load.
 * Sound because the cache only keeps rows found (an insert cannot make a kept answer
 * stale: a new session row is read only under its own, never-seen id), and the one
 * statement reading `sessions` (user-principal.ts) inner-joins it, so an unknown session
 * is no row and is never kept. Updates (revocation) and deletes still empty it.
 */
const INSERT_EXEMPT: ReadonlySet<string> = new Set(["sessions"]);

/** Options of {@link createSqlRunner}. */
export interface SqlRunnerOptions {
  /** Entries per cached statement; 0 turns the state cache off (default 10,000). */
  stateCacheSize?: number;
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
        return prepare(sql).run(...params.map(sqliteParam)).changes;
      },
      async cachedGet<T>(sql: string, params: readonly unknown[]) {
        return cachedGet<T>(sql, params);
      },
      async cachedAll<T>(sql: string, params: readonly unknown[]) {
        return cachedAll<T>(sql, params);
      },
      cacheStats: () => cache?.stats() ?? { ...NO_CACHE },
      sync: { cachedGet, cachedAll },
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
  // PostgreSQL serves several instances: another instance's write could only be learnt of
  // asynchronously (LISTEN/NOTIFY), so the state is read on every request instead.
  return {
    get,
    all,
    async run(sql: string, params: readonly unknown[] = []) {
      const res = (await conn.execute(sql, [...params], "run")) as { affectedRows?: number };
      return res.affectedRows ?? 0;
    },
    cachedGet: get,
    cachedAll: all,
    cacheStats: () => ({ ...NO_CACHE }),
  };
}

const NO_CACHE: StateCacheStats = { enabled: false, hits: 0, misses: 0, invalidations: 0 };

/** Table names a statement reads (after FROM and JOIN). */
function tablesOf(sql: string): string[] {
  return [...sql.matchAll(/\b(?:from|join)\s+([A-Za-z_][A-Za-z0-9_.]*)/gi)].map((m) => m[1]!.toLowerCase());
}

/**
 * Authentication state read once and answered from memory until it may have changed: the
 * embedded (SQLite) deployment's answer to a per-request read that, in a loaded server,
 * cost ~20 µs of a ~200 µs request.
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
 *   per request: in a loaded server the statement cost ~9 µs, and a turn serves many.)
 * - while this connection is inside a transaction, reads bypass the cache and store
 *   nothing (they could see writes that are then rolled back).
 * Any write to a watched table empties the whole cache (the coalesced last-used writes too,
 * once per flush interval): changes to who may authenticate are rare next to reads.
 * Only rows found are kept (an insert can never be hidden by a remembered "no row"), and
 * every time-based rule (expiry, rotation grace) is still evaluated by the caller against
 * the clock on each request. Rows are frozen: callers share them.
 */
class StateCache {
  private readonly buckets = new Map<string, LRUCache<string, object>>();
  private readonly dataVersion: BetterSqliteStatement;
  private version: unknown;
  private counters = { hits: 0, misses: 0, invalidations: 0 };
  /** Whether data_version was read in the current event-loop turn (reset by setImmediate). */
  private checkedThisTurn = false;
  private readonly endTurn = () => {
    this.checkedThisTurn = false;
  };

  constructor(
    private readonly db: BetterSqliteDatabase,
    private readonly perStatement: number,
  ) {
    db.function("tessera_state_changed", { deterministic: false }, () => {
      this.invalidate();
      return null;
    });
    for (const table of STATE_TABLES) {
      for (const op of ["insert", "update", "delete"]) {
        if (op === "insert" && INSERT_EXEMPT.has(table)) continue;
        db.exec(
          `create temp trigger if not exists tessera_state_${table}_${op} after ${op} on main.${table} ` +
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
    let bucket = this.buckets.get(sql);
    if (bucket === undefined) {
      const unwatched = tablesOf(sql).filter((t) => !(STATE_TABLES as readonly string[]).includes(t));
      if (unwatched.length > 0)
        throw new Error(
          `cached statement reads tables the state cache does not watch: ${unwatched.join(", ")}`,
        );
      bucket = new LRUCache<string, object>({ max: this.perStatement });
      this.buckets.set(sql, bucket);
    }
    const key = params.length === 1 ? String(params[0]) : params.map(String).join("\u0000");
    const hit = bucket.get(key);
    if (hit !== undefined) {
      this.counters.hits++;
      return hit as T;
    }
    this.counters.misses++;
    const value = load();
    if (value !== undefined && !(Array.isArray(value) && value.length === 0))
      bucket.set(key, freezeRows(value as object));
    return value;
  }

  invalidate(): void {
    this.counters.invalidations++;
    for (const bucket of this.buckets.values()) bucket.clear();
  }

  stats(): StateCacheStats {
    return { enabled: true, ...this.counters };
  }
}

/** Freeze a row, or a list of rows and each row in it (rows are flat). */
function freezeRows<T extends object>(value: T): T {
  if (Array.isArray(value)) for (const v of value) if (v && typeof v === "object") Object.freeze(v);
  return Object.freeze(value);
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
