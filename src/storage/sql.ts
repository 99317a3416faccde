import type { EntityManager } from "@mikro-orm/knex";
import type { Awaitable } from "../auth/awaitable.js";
import { parseScopeString } from "../auth/scopes.js";
import type { Storage } from "./orm.js";
import type { PgNotifier } from "./pg-notify.js";
import { PgStateCache } from "./pg-state.js";
import { ANNOUNCED_TABLES, stateChannel, TRIGGERED_TABLES_SQL } from "./pg-state-channel.js";
import { installWriteHook } from "./pg-write-hook.js";
import { NO_CACHE, type STATE_TABLES, type StateCacheStats } from "./row-cache.js";
import { createSqliteRunner } from "./sqlite-runner.js";

/**
 * Raw, parameterised SQL for the per-request authentication path.
 *
 * Why not the ORM there: an `em.fork()` plus `findOne` per request costs many times what
 * a prepared statement does, on the path every call takes (figures in commit 1706656).
 * Every request sees the credential's current row state (revocation, expiry, disabled
 * owner or tenant take effect on the very next request): read per request on PostgreSQL,
 * and on SQLite from a cache that every change empties first (see sqlite-runner.ts).
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
   * StateCache in sqlite-runner.ts, {@link PgStateCache}). The one synchronous source of the
   * authentication path: a kept row is returned as it is, without a promise; a miss is a
   * promise on PostgreSQL and, on SQLite, whose driver reads in the calling turn, the row
   * read now (a promise while another request's transaction is open: no read, cached or
   * not, sees uncommitted writes; see SqliteReadGate). A plain read where no cache
   * guarantee exists (PostgreSQL without a listener).
   */
  cachedGet<T>(sql: string, params: readonly unknown[]): Awaitable<T | undefined>;
  /** Like {@link all}, cached and answered under the same rules as {@link cachedGet}. */
  cachedAll<T>(sql: string, params: readonly unknown[]): Awaitable<T[]>;
  /** Counters of the state cache (all zero when there is none). */
  cacheStats(): StateCacheStats;
  /**
   * PostgreSQL with a state cache: empty it now, as a notification does (reads in flight are
   * not kept): every state read from now on sees what had committed before the call.
   * Absent on SQLite, whose cache every write empties first, and without a cache.
   */
  evictState?(): void;
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
  /** SQLite: write the gates' aggregated reports of the open interval now (at close). */
  flushReports?(): void;
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
  /**
   * Where the PostgreSQL cache reports a barrier past its bound and missing triggers, and
   * SQLite a state read refused because another request's transaction outlasted its wait.
   */
  logger?: {
    info(obj: object, msg: string): void;
    warn(obj: object, msg: string): void;
    error(obj: object, msg: string): void;
  };
  /** The clock of the SQLite gates' aggregated reports (default: the machine's). */
  clock?: () => number;
}

/** Build the runner for a storage: prepared statements on SQLite, the pool on PostgreSQL. */
export async function createSqlRunner(storage: Storage, options: SqlRunnerOptions = {}): Promise<SqlRunner> {
  const cacheSize = options.stateCacheSize ?? 10_000;
  if (storage.target.kind === "sqlite")
    return createSqliteRunner(storage, cacheSize, options.logger, options.clock);
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
    ...(cache ? { evictState: cache.evict.bind(cache) } : {}),
  };
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
    // PostgreSQL's unbounded timestamps: no end (an expiry of "infinity" never comes).
    if (value === "infinity") return Number.POSITIVE_INFINITY;
    if (value === "-infinity") return Number.NEGATIVE_INFINITY;
    // Years past 9999 (a far expiry, or near it in a database TimeZone east of UTC) come with
    // five digits, which Date.parse reads only as an expanded year ("+010000").
    const year = /^(\d{5,6})-/.exec(value);
    const text = year ? `+${year[1]!.padStart(6, "0")}${value.slice(year[1]!.length)}` : value;
    const iso = text.replace(" ", "T").replace(/([+-]\d\d)$/, "$1:00");
    const ms = Date.parse(iso);
    if (!Number.isNaN(ms)) return ms;
  }
  // Never read as "no time": a revocation or an expiry the code cannot read must not pass for
  // none (a session's DateStyle once turned revoked_at into text Date.parse refused).
  throw new Error(`a database timestamp in an unexpected form (${typeof value})`);
}
