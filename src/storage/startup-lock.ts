import { createHash } from "node:crypto";
import { chmodSync, closeSync, openSync } from "node:fs";
import { createRequire } from "node:module";
import { setTimeout as sleep } from "node:timers/promises";
import type { EntityManager } from "@mikro-orm/knex";
import { assertOwned } from "../private-files.js";
import { CLIENT_TIMEOUT_MARGIN_MS } from "./pg-bounds.js";

/** How long a start-up waits for another instance's migrations and bootstrap. */
export const STARTUP_LOCK_TIMEOUT_MS = 120_000;

/** Raised when another instance held the start-up lock for longer than the timeout. */
export class StartupLockTimeoutError extends Error {
  override readonly name = "StartupLockTimeoutError";
}

/** The two-integer key of the PostgreSQL advisory lock guarding one schema's start-up. */
export function advisoryLockKey(schema: string): [number, number] {
  // Advisory locks are per database, not per schema: a key per schema lets instances of
  // different schemas (tenants of one cluster, test runs) start without waiting on each other.
  const digest = createHash("sha256").update(`tessera:startup:${schema}`).digest();
  // classid: "TSRA" as a constant namespace, so our keys do not meet another application's.
  return [0x54535241, digest.readInt32BE(0)];
}

/**
 * Run `fn` holding the PostgreSQL advisory lock of `schema`: a transaction on one pooled
 * connection takes `pg_advisory_xact_lock` and stays open while `fn` works on other
 * connections; committing (or the connection dying with the process) releases it, so a
 * crashed instance never leaves it held.
 */
export async function withPostgresLock<T>(
  em: EntityManager,
  schema: string,
  fn: () => Promise<T>,
  timeoutMs = STARTUP_LOCK_TIMEOUT_MS,
): Promise<T> {
  const knex = em.getConnection().getKnex();
  const [classId, objId] = advisoryLockKey(schema);
  const waitMs = Math.max(1, Math.floor(timeoutMs));
  return knex.transaction(async (trx) => {
    // The wait has its own bound (lock_timeout), not the per-statement one of every other
    // statement (pg-bounds.ts): lifted on the server for this transaction, and on the
    // client for this statement (a little past the lock's bound).
    await trx.raw(`set local lock_timeout = ${waitMs}`);
    await trx.raw("set local statement_timeout = 0");
    try {
      await trx
        .raw("select pg_advisory_xact_lock(?, ?)", [classId, objId])
        .options({ query_timeout: waitMs + CLIENT_TIMEOUT_MARGIN_MS });
    } catch (err) {
      if ((err as { code?: unknown }).code === "55P03")
        throw new StartupLockTimeoutError(
          `another instance held the start-up lock of schema "${schema}" for more than ${timeoutMs / 1000} s`,
        );
      throw err;
    }
    return fn();
  });
}

/** The few calls of better-sqlite3 (MikroORM's SQLite driver, already installed) used here. */
interface SqliteHandle {
  exec(sql: string): void;
  close(): void;
}
type SqliteOpen = new (path: string, options: { timeout: number }) => SqliteHandle;

/**
 * Run `fn` holding an exclusive lock on the file `path` (created 0600 if absent), for
 * start-ups of several processes on one SQLite file or one certificate folder.
 *
 * Node has no flock; the lock is an exclusive SQLite transaction on a side file, which
 * takes the operating system's file lock: it is released when the process ends however it
 * ends (no stale lock file to clean up, unlike a pid or mkdir lock), and SQLite also
 * serializes two holders within one process. Waiting polls without blocking the event loop.
 */
export async function withFileLock<T>(
  path: string,
  fn: () => Promise<T>,
  timeoutMs = STARTUP_LOCK_TIMEOUT_MS,
): Promise<T> {
  const Database = createRequire(import.meta.url)("better-sqlite3") as SqliteOpen;
  // It persists beside the database (or the certificates): one another user planted in a
  // shared folder they could hold locked for ever (no start gets past it), or make a link
  // through which this open and chmod, as root, would create or close a file of their choosing.
  assertOwned(path, "start-up lock file");
  closeSync(openSync(path, "a", 0o600));
  chmodSync(path, 0o600);
  const db = new Database(path, { timeout: 0 });
  try {
    const deadline = Date.now() + timeoutMs;
    for (let wait = 10; ; wait = Math.min(wait * 2, 200)) {
      try {
        db.exec("begin exclusive");
        break;
      } catch (err) {
        if ((err as { code?: unknown }).code !== "SQLITE_BUSY") throw err;
        if (Date.now() > deadline)
          throw new StartupLockTimeoutError(
            `another process held the lock ${path} for more than ${timeoutMs / 1000} s`,
          );
        await sleep(wait);
      }
    }
    try {
      return await fn();
    } finally {
      db.exec("rollback");
    }
  } finally {
    db.close();
  }
}
