import type { EntityManager } from "@mikro-orm/knex";
import type { Storage } from "./orm.js";

/**
 * Raw, parameterised SQL for the per-request authentication path.
 *
 * Why not the ORM there: an `em.fork()` plus `findOne` per request cut throughput to
 * about a third in a prototype, while a prepared better-sqlite3 statement costs ~7 µs.
 * Every request still reads the credential's current row state (revocation, expiry,
 * disabled owner or tenant take effect on the very next request); it just reads it cheaply.
 * SQL here must be portable between SQLite and PostgreSQL (`?` placeholders).
 */
export interface SqlRunner {
  get<T>(sql: string, params?: readonly unknown[]): Promise<T | undefined>;
  all<T>(sql: string, params?: readonly unknown[]): Promise<T[]>;
  /** Run a write; returns the number of rows changed. */
  run(sql: string, params?: readonly unknown[]): Promise<number>;
}

interface BetterSqliteStatement {
  get(...params: unknown[]): unknown;
  all(...params: unknown[]): unknown[];
  run(...params: unknown[]): { changes: number };
}
interface BetterSqliteDatabase {
  prepare(sql: string): BetterSqliteStatement;
}

function sqliteParam(value: unknown): unknown {
  // better-sqlite3 binds numbers, strings, bigints, buffers and null only.
  if (value instanceof Date) return value.getTime();
  if (typeof value === "boolean") return value ? 1 : 0;
  return value === undefined ? null : value;
}

/** Build the runner for a storage: prepared statements on SQLite, the pool on PostgreSQL. */
export async function createSqlRunner(storage: Storage): Promise<SqlRunner> {
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
    return {
      async get<T>(sql: string, params: readonly unknown[] = []) {
        return prepare(sql).get(...params.map(sqliteParam)) as T | undefined;
      },
      async all<T>(sql: string, params: readonly unknown[] = []) {
        return prepare(sql).all(...params.map(sqliteParam)) as T[];
      },
      async run(sql: string, params: readonly unknown[] = []) {
        return prepare(sql).run(...params.map(sqliteParam)).changes;
      },
    };
  }
  const em: EntityManager = storage.em;
  const conn = em.getConnection();
  return {
    async get<T>(sql: string, params: readonly unknown[] = []) {
      const rows = (await conn.execute(sql, [...params], "all")) as T[];
      return rows[0];
    },
    async all<T>(sql: string, params: readonly unknown[] = []) {
      return (await conn.execute(sql, [...params], "all")) as T[];
    },
    async run(sql: string, params: readonly unknown[] = []) {
      const res = (await conn.execute(sql, [...params], "run")) as { affectedRows?: number };
      return res.affectedRows ?? 0;
    },
  };
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
