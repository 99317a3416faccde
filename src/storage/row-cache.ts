import { LRUCache } from "lru-cache";

/** The tables of users (and their tenants), their sessions and their tokens. */
const USER_TABLES = ["users", "tenants", "sessions", "api_tokens"] as const;

/** The tables of machine users: their credentials, applications and certificate bindings. */
const MACHINE_TABLES = [
  "machine_users",
  "machine_credentials",
  "machine_user_applications",
  "machine_user_certificates",
] as const;

/**
 * Tables whose rows decide who may authenticate: users, tenants, user sessions, tokens,
 * machine users with their credentials, applications and certificate bindings. A statement read through
 * `SqlRunner.cachedGet` may only read these (checked on its first use), because only
 * changes to these tables invalidate the cache.
 */
export const STATE_TABLES = [...USER_TABLES, ...MACHINE_TABLES] as const;

/**
 * Watched tables whose inserts do not empty the state cache. Every login inserts a
 * session, and emptying the whole cache on each would make it useless under login load.
 * Sound because the cache only keeps rows found (an insert cannot make a kept answer
 * stale: a new session row is read only under its own, never-seen id), and the one
 * statement reading `sessions` (user-principal.ts) inner-joins it, so an unknown session
 * is no row and is never kept. Updates (revocation) and deletes still empty it.
 */
export const INSERT_EXEMPT: ReadonlySet<string> = new Set(["sessions"]);

/** What the state cache did since start. */
export interface StateCacheStats {
  /** Whether cached answers are served now (PostgreSQL: only while the listener is online and proven recently). */
  enabled: boolean;
  hits: number;
  /** Reads that went to the database (while enabled, or, on PostgreSQL, while the cache was off). */
  misses: number;
  /** Times the whole cache was dropped because a watched table changed (or, on PostgreSQL, could have). */
  invalidations: number;
  /**
   * PostgreSQL: tables whose change-announcing trigger was missing at the last check (at
   * start and whenever the listener comes back); while any is, the cache is off.
   */
  triggersMissing?: number;
  /** SQLite: state reads that waited for another request's open transaction to end (see SqliteReadGate). */
  readsHeld?: number;
  /** SQLite: of those, reads refused (Unavailable) because the transaction stayed open past the bound. */
  readsRefused?: number;
}

/** The counters of a runner without a state cache. */
export const NO_CACHE: Readonly<StateCacheStats> = Object.freeze({
  enabled: false,
  hits: 0,
  misses: 0,
  invalidations: 0,
});

/** Table names a statement reads (after FROM and JOIN). */
function tablesOf(sql: string): string[] {
  return [...sql.matchAll(/\b(?:from|join)\s+([A-Za-z_][A-Za-z0-9_.]*)/gi)].map((m) => m[1]!.toLowerCase());
}

/** Freeze a row, or a list of rows and each row in it (rows are flat). */
function freezeRows<T extends object>(value: T): T {
  if (Array.isArray(value)) for (const v of value) if (v && typeof v === "object") Object.freeze(v);
  return Object.freeze(value);
}

/**
 * The storage of both state caches (SQLite's and PostgreSQL's): one LRU per statement,
 * keyed by its parameters, holding only rows found, frozen (callers share them). What
 * makes an entry trustworthy (when to empty it) is the caller's business.
 */
export class RowBuckets {
  private readonly buckets = new Map<string, LRUCache<string, object>>();
  readonly counters = { hits: 0, misses: 0, invalidations: 0 };

  constructor(private readonly perStatement: number) {}

  /** The bucket of `sql`, created on first use after checking it reads only watched tables. */
  private bucket(sql: string): LRUCache<string, object> {
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
    return bucket;
  }

  private static key(params: readonly unknown[]): string {
    return params.length === 1 ? String(params[0]) : params.map(String).join("\u0000");
  }

  /** The kept answer of `sql` with `params`, counting a hit; undefined (not counted) when none. */
  get<T>(sql: string, params: readonly unknown[]): T | undefined {
    const hit = this.bucket(sql).get(RowBuckets.key(params));
    if (hit !== undefined) this.counters.hits++;
    return hit as T | undefined;
  }

  /** Keep a loaded answer (rows found only: an empty answer is never kept). */
  set(sql: string, params: readonly unknown[], value: unknown): void {
    if (value !== undefined && value !== null && !(Array.isArray(value) && value.length === 0))
      this.bucket(sql).set(RowBuckets.key(params), freezeRows(value as object));
  }

  /** Drop every entry. */
  clear(): void {
    this.counters.invalidations++;
    for (const bucket of this.buckets.values()) bucket.clear();
  }
}

/**
 * `derive` computed once per row object: the state caches hand out the same frozen row (or
 * row list) until it changes, so what is derived from it (parsed scopes, flags, a folded
 * state) is derived once per change rather than on every request. Without a cache each
 * read is a new object, and the derivation simply runs each time. What it derives is
 * frozen (shallowly): every request authenticated by the same row shares it.
 */
export function oncePerRow<R extends object, V>(derive: (row: R) => V): (row: R) => V {
  const derived = new WeakMap<R, V>();
  return (row) => {
    let value = derived.get(row);
    if (value === undefined) {
      value = Object.freeze(derive(row));
      derived.set(row, value);
    }
    return value;
  };
}
