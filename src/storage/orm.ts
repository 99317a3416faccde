import { setTimeout as sleep } from "node:timers/promises";
import { BetterSqliteDriver, MikroORM as BetterSqliteORM } from "@mikro-orm/better-sqlite";
import type { MikroORM, Options } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/knex";
import { Migrator } from "@mikro-orm/migrations";
import { PostgreSqlDriver, MikroORM as PostgresORM } from "@mikro-orm/postgresql";
import { ENTITIES } from "./entities.js";
import { MIGRATIONS } from "./migrations/index.js";
import { type PgBounds, pgBoundOptions } from "./pg-bounds.js";
import { ImmediateBetterSqliteDialect } from "./sqlite-begin.js";
import { checkpointOffLoop, type SqliteCheckpointer } from "./sqlite-checkpointer.js";
import { prepareSqliteFiles, tighten } from "./sqlite-files.js";
import { withFileLock, withPostgresLock } from "./startup-lock.js";

/** Which database a URL selects. */
export type DatabaseKind = "sqlite" | "postgresql";

/** A parsed database URL. */
export interface DatabaseTarget {
  kind: DatabaseKind;
  /** SQLite: file path or ":memory:". PostgreSQL: the connection URL without our `schema` parameter. */
  location: string;
  /** PostgreSQL schema (from `?schema=`), default "public". */
  schema?: string;
}

/**
 * Parse `sqlite:<path>`, `sqlite::memory:`, a bare path ending in .db/.sqlite, or
 * `postgres://` / `postgresql://` (with an optional `schema` query parameter).
 */
export function parseDatabaseUrl(url: string): DatabaseTarget {
  if (/^postgres(ql)?:\/\//.test(url)) {
    const u = new URL(url);
    const schema = u.searchParams.get("schema") ?? undefined;
    u.searchParams.delete("schema");
    if (schema !== undefined && !/^[a-z_][a-z0-9_]{0,62}$/.test(schema)) {
      throw new Error(`database.url: schema "${schema}" must match [a-z_][a-z0-9_]*`);
    }
    return { kind: "postgresql", location: u.toString(), ...(schema ? { schema } : {}) };
  }
  if (url.startsWith("sqlite:")) {
    const location = url.slice("sqlite:".length);
    if (!location) throw new Error("database.url: sqlite: needs a file path or :memory:");
    return { kind: "sqlite", location };
  }
  if (/\.(db|sqlite3?)$/.test(url)) return { kind: "sqlite", location: url };
  throw new Error(`database.url: unsupported URL (use sqlite:<file> or postgres://…)`);
}

/** The ORM and what the rest of the service needs from it. */
export interface Storage {
  orm: MikroORM;
  /** The root EntityManager; fork it per request (never use it directly in handlers). */
  em: EntityManager;
  target: DatabaseTarget;
  /**
   * Longest wait for a pooled connection, in ms (`database.connectTimeoutMs`): knex's acquire
   * bound on PostgreSQL; on SQLite, the whole wait of raw SQL for the one connection that
   * other requests' transactions hold (see SqlitePoolQueue).
   */
  connectionWaitMs: number;
  /** Run pending migrations (under the start-up lock); returns the names applied. */
  migrate(): Promise<string[]>;
  /**
   * Run `fn` holding the start-up lock shared by every process on this database (a
   * PostgreSQL advisory lock per schema, a lock file beside a SQLite file; none for
   * in-memory SQLite): migrations and the bootstrap run one instance at a time, so
   * instances started together neither race nor half-apply. Not re-entrant: what must
   * run under the lock (migrations) is given to `fn` in `held`.
   */
  withStartupLock<T>(fn: (held: StartupLockHeld) => Promise<T>): Promise<T>;
  /** Whether the database answers a trivial query. */
  ping(): Promise<boolean>;
  close(): Promise<void>;
}

/** What runs under the start-up lock {@link Storage.withStartupLock} holds. */
export interface StartupLockHeld {
  /** Run pending migrations; returns the names applied. */
  migrate(): Promise<string[]>;
}

/** Options for {@link initORM}. */
export interface InitOrmOptions {
  url: string;
  debug?: boolean;
  /** Where the ORM's log lines go (default: MikroORM's, on stdout); the server passes its logger. */
  log?: (message: string) => void;
  /** Run migrations before returning (the server does; `migrate --status` does not). */
  migrate?: boolean;
  /**
   * PostgreSQL: bounds on connecting and on each statement (default 5,000 ms each, as the
   * `database.*TimeoutMs` config keys; see pg-bounds.ts). SQLite: `connectTimeoutMs` only
   * ({@link Storage.connectionWaitMs}).
   */
  bounds?: Partial<PgBounds>;
  /** How migrations wait for locks and retry (defaults: {@link MIGRATION_LOCK_DEFAULTS}; tests shorten them). */
  migrationLocks?: Partial<MigrationLockOptions>;
}

/**
 * How a migration waits for the table locks its statements need, so that it never queues
 * every other session behind it: an `ALTER TABLE` waiting for a long transaction holds its
 * place in the lock queue, and every read of that table by every running instance waits
 * behind it (until its own statement timeout: 503s fleet-wide). PostgreSQL's `lock_timeout`
 * bounds each wait; the attempt then rolls back (nothing half-applied: all pending
 * migrations run in one transaction), the readers proceed, and the migration tries again
 * after a short pause, until `budgetMs` has passed.
 */
export interface MigrationLockOptions {
  /**
   * PostgreSQL `lock_timeout` of the migration transaction, in ms. Unset: half the
   * per-statement bound (so a reader queued behind a waiting migration still answers
   * within its own), at most 2 s.
   */
  lockTimeoutMs: number;
  /** How long attempts go on before the migration fails with {@link MigrationLockTimeoutError}. */
  budgetMs: number;
}

/** The defaults of {@link MigrationLockOptions} (lockTimeoutMs: see there). */
export const MIGRATION_LOCK_DEFAULTS = { maxLockTimeoutMs: 2_000, budgetMs: 60_000 } as const;

/** Raised when migrations could not take their locks within the retry budget. */
export class MigrationLockTimeoutError extends Error {
  override readonly name = "MigrationLockTimeoutError";
}

/**
 * Whether a migration attempt gave way to another session's lock, and may be tried again
 * as it is (the attempt's transaction rolled back): PostgreSQL's lock_not_available
 * (55P03, our lock_timeout) and deadlock_detected (40P01); SQLite's BUSY (another
 * connection held the write lock past the busy timeout, or the snapshot went stale).
 */
export function isLockContention(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 3; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (code === "55P03" || code === "40P01") return true;
    if (typeof code === "string" && code.startsWith("SQLITE_BUSY")) return true;
  }
  return false;
}

/**
 * How long a SQLite statement waits for another connection's write lock (the CLI's, a second
 * Tessera's on the same file) before failing with SQLITE_BUSY, answered Unavailable with
 * Retry-After (storage/errors.ts). Short because better-sqlite3 waits on the event loop's
 * thread: nothing else is served meanwhile (5 s froze every request for 5 s per write under
 * a lock held that long). Longer than a healthy peer's write lock (a short transaction).
 * An ORM write transaction waits at its BEGIN, before it reads (see sqlite-begin.ts).
 */
export const SQLITE_BUSY_TIMEOUT_MS = 100;

/** Attempts of {@link Storage.migrate} when another schema vanished under its introspection. */
const MIGRATE_ATTEMPTS = 4;

/**
 * Whether a migration failed because a schema or table of *another* schema was dropped
 * while MikroORM's migrator looked for its own table: it lists every table of the database
 * (information_schema) and then resolves each name (`::regclass`), so a concurrent
 * `DROP SCHEMA` anywhere in the database (a neighbour's schema, a test's) fails it with
 * 3F000 (invalid schema name) or 42P01 (undefined table). Nothing was applied (migrations
 * run in one transaction, after that look-up), so trying again is safe; a migration that
 * itself names a missing relation fails every attempt and is reported as it is.
 */
export function isSchemaDroppedMeanwhile(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 3; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (code === "3F000" || code === "42P01") return true;
  }
  return false;
}

/** A database that cannot be reached, said so in one line (the driver's own words after it). */
function unreachable(err: unknown): Error | undefined {
  const code = (err as { code?: unknown }).code;
  if (typeof code !== "string") return undefined;
  if (
    !["ECONNREFUSED", "ENOTFOUND", "ETIMEDOUT", "EHOSTUNREACH", "ECONNRESET"].includes(code) &&
    !/^57P0[123]$/.test(code)
  )
    return undefined;
  return new Error(`cannot reach the database: ${(err as Error).message}`, { cause: err });
}

/**
 * knex's own log (it prints to stdout by default): its "Connection Error: Error: <SQL> -
 * read ECONNRESET" warnings embed the statement with its values inlined (a token's hash
 * among them). Only what follows the statement is kept, and it goes where the ORM's log
 * goes (the service's logger), or nowhere.
 */
export function knexLog(log: ((message: string) => void) | undefined) {
  const clean = (message: unknown) => {
    const text = String(message);
    const tail = text.lastIndexOf(" - ");
    // "Connection Error: Error: insert into … values (…) - read ECONNRESET" → "… read ECONNRESET"
    const safe = tail >= 0 ? `${text.slice(0, text.indexOf(":") + 1)} ${text.slice(tail + 3)}` : text;
    log?.(`knex: ${safe.slice(0, 200)}`);
  };
  return { warn: clean, error: clean, deprecate: clean, debug: () => undefined };
}

/** Connect to the configured database (migrations run on request). */
export async function initORM(options: InitOrmOptions): Promise<Storage> {
  const target = parseDatabaseUrl(options.url);
  const common: Partial<Options> = {
    entities: ENTITIES,
    // SQL only, never 'query-params': `debug: true` would log every statement with its
    // values inlined (password and token hashes among them).
    debug: options.debug ? ["query"] : false,
    ...(options.log ? { logger: options.log, colors: false } : {}),
    extensions: [Migrator],
    // Entity classes are plain; no metadata discovery from TS sources is needed.
    discovery: { warnWhenNoEntities: false },
    migrations: {
      migrationsList: MIGRATIONS,
      transactional: true,
      allOrNothing: true,
      snapshot: false,
      tableName: "mikro_orm_migrations",
      silent: true,
    },
    allowGlobalContext: false,
  };
  const statementTimeoutMs = options.bounds?.statementTimeoutMs ?? 5_000;
  const connectTimeoutMs = options.bounds?.connectTimeoutMs ?? 5_000;
  let orm: MikroORM;
  /** SQLite file: the thread that checkpoints its WAL (see sqlite-checkpointer.ts). */
  let checkpointer: SqliteCheckpointer | undefined;
  // PostgreSQL: lifts the client-side statement bound for a migration (see pg-bounds.ts).
  let exempt = <T>(fn: () => Promise<T>) => fn();
  if (target.kind === "sqlite") {
    // Where SQLite keeps the file and its -wal/-shm: beside a symbolic link's target.
    const file = target.location === ":memory:" ? target.location : prepareSqliteFiles(target.location);
    orm = await BetterSqliteORM.init({
      ...common,
      driver: BetterSqliteDriver,
      dbName: target.location,
      // Write transactions take the write lock at BEGIN (see sqlite-begin.ts).
      driverOptions: { client: ImmediateBetterSqliteDialect, log: knexLog(options.log) },
    } as Options<BetterSqliteDriver>);
    if (target.location !== ":memory:") {
      // WAL lets readers proceed during writes; NORMAL sync is durable across process crashes in WAL mode.
      await orm.em.getConnection().execute("pragma journal_mode = wal");
      await orm.em.getConnection().execute("pragma synchronous = normal");
      // SQLite gives -wal and -shm the database file's mode; ones left by an older version are tightened.
      for (const suffix of ["-wal", "-shm"]) tighten(`${file}${suffix}`, 0o600);
      const conn = orm.em.getConnection();
      checkpointer = await checkpointOffLoop((sql) => conn.execute(sql), target.location, options.log);
    }
    await orm.em.getConnection().execute(`pragma busy_timeout = ${SQLITE_BUSY_TIMEOUT_MS}`);
  } else {
    const bounds = pgBoundOptions({ statementTimeoutMs, connectTimeoutMs });
    exempt = bounds.exempt;
    orm = await PostgresORM.init({
      ...common,
      driver: PostgreSqlDriver,
      clientUrl: target.location,
      driverOptions: {
        log: knexLog(options.log),
        acquireConnectionTimeout: bounds.driverOptions.acquireConnectionTimeout,
        connection: {
          ...bounds.driverOptions.connection,
          // Unqualified names in migrations and raw queries resolve to the configured schema. Timestamps
          // come back as text, read as ISO (toMillis): another DateStyle (a database's or role's default)
          // would read a revoked_at as none, a revoked credential as valid.
          // node-pg reads PGOPTIONS only when no options are given: kept, ahead of ours.
          options: [
            process.env.PGOPTIONS,
            "-c DateStyle=ISO",
            target.schema ? `-c search_path=${target.schema}` : undefined,
          ]
            .filter(Boolean)
            .join(" "),
        },
      },
      ...(target.schema ? { schema: target.schema } : {}),
      pool: { min: 1, max: 10, ...bounds.pool },
    } as Options<PostgreSqlDriver>).catch((err: unknown) => {
      throw unreachable(err) ?? err;
    });
  }
  const em = orm.em as unknown as EntityManager;
  const lockTimeoutMs = Math.max(
    1,
    Math.floor(
      options.migrationLocks?.lockTimeoutMs ??
        (statementTimeoutMs > 0
          ? Math.min(MIGRATION_LOCK_DEFAULTS.maxLockTimeoutMs, statementTimeoutMs / 2)
          : MIGRATION_LOCK_DEFAULTS.maxLockTimeoutMs),
    ),
  );
  const lockBudgetMs = options.migrationLocks?.budgetMs ?? MIGRATION_LOCK_DEFAULTS.budgetMs;
  const migrateHeld = async (): Promise<string[]> => {
    const migrator = orm.getMigrator();
    const conn = em.getConnection();
    // A migration may rewrite a large table: exempt from the statement bounds (server and
    // client side), in the one transaction that applies every pending migration; but each
    // lock it waits for is bounded (see MigrationLockOptions).
    const up = () =>
      target.kind === "postgresql"
        ? exempt(() =>
            conn.transactional(async (trx) => {
              await conn.execute("set local statement_timeout = 0", [], "run", trx);
              await conn.execute(`set local lock_timeout = ${lockTimeoutMs}`, [], "run", trx);
              return migrator.up({ transaction: trx });
            }),
          )
        : migrator.up();
    const deadline = Date.now() + lockBudgetMs;
    let contended = 0;
    let dropped = 0;
    for (;;) {
      try {
        const applied = await up();
        return applied.map((m) => m.name);
      } catch (err) {
        if (isLockContention(err)) {
          contended++;
          // Jittered, growing pauses: instances retrying together do not retry in step.
          const pause = Math.min(2_000, 50 * 2 ** Math.min(contended, 6)) * (0.5 + Math.random() / 2);
          if (Date.now() + pause > deadline)
            throw new MigrationLockTimeoutError(
              `migrations could not take their table locks within ${lockBudgetMs / 1000} s (${contended} attempts, each waiting at most ${lockTimeoutMs} ms): another session holds a lock on a table they change (a long transaction? see pg_stat_activity); nothing was applied, try again`,
              { cause: err },
            );
          await sleep(pause);
          continue;
        }
        dropped++;
        if (target.kind !== "postgresql" || dropped >= MIGRATE_ATTEMPTS || !isSchemaDroppedMeanwhile(err))
          throw err;
        await sleep(25 * dropped);
      }
    }
  };
  // Not re-entrant (a nested call would wait for itself): what needs doing under the lock
  // gets it from `held`.
  const withStartupLock = async <T>(fn: (held: StartupLockHeld) => Promise<T>): Promise<T> => {
    const run = () => fn({ migrate: migrateHeld });
    if (target.kind === "sqlite" && target.location === ":memory:") return run();
    return target.kind === "postgresql"
      ? withPostgresLock(em, target.schema ?? "public", run)
      : withFileLock(`${target.location}-startup.lock`, run);
  };
  const storage: Storage = {
    orm,
    em,
    target,
    connectionWaitMs: connectTimeoutMs,
    withStartupLock,
    migrate() {
      return withStartupLock((held) => held.migrate());
    },
    async ping() {
      try {
        await em.getConnection().execute("select 1");
        return true;
      } catch {
        return false;
      }
    },
    async close() {
      await checkpointer?.close();
      await orm.close(true);
    },
  };
  try {
    if (target.schema) {
      const schema = target.schema;
      // Under the lock: two concurrent "create schema if not exists" can still collide (23505).
      await withStartupLock(() => em.getConnection().execute(`create schema if not exists "${schema}"`));
    }
    if (options.migrate ?? true) await storage.migrate();
  } catch (err) {
    // A pool left open would keep a failed start alive.
    await checkpointer?.close();
    await orm.close(true).catch(() => undefined);
    throw unreachable(err) ?? err;
  }
  return storage;
}
