import { setTimeout as sleep } from "node:timers/promises";
import { TesseraError } from "../errors.js";
import { isOutage } from "./errors.js";
import type { Storage } from "./orm.js";

/**
 * A COMMIT whose answer was lost (PostgreSQL): the connection broke, or the client-side
 * bound gave up on it, after the COMMIT may have reached the server. The transaction may
 * have landed or not; nothing the client saw says which. (SQLite commits in process: its
 * COMMIT fails or succeeds, never in between.)
 *
 * The error is marked where it happens (the pooled connection's query hook, see
 * {@link watchCommits}) with the server process that ran the transaction, which is what
 * makes the outcome decidable afterwards: once that process is gone (ended by us, or on its
 * own), its transaction is either committed and visible, or rolled back for good.
 */
export interface LostCommit {
  /** The server process (`pg_backend_pid()`) of the connection that sent the COMMIT. */
  pid: number | undefined;
}

/** Property set on the driver's error (MikroORM's DriverException copies own properties of the error it wraps). */
const LOST_COMMIT = "tesseraLostCommit";

/** The few members of a pg client the hook uses. */
interface PgClientLike {
  query(config: unknown, ...rest: unknown[]): unknown;
  processID?: number | null;
}

/** The SQL text of a query as pg receives it (a string, or a config object with `text`). */
function textOf(config: unknown): string {
  const text = typeof config === "string" ? config : (config as { text?: unknown } | null)?.text;
  return typeof text === "string" ? text : "";
}

/**
 * Whether a failed COMMIT leaves its outcome unknown: the server said nothing (a socket
 * error, pg's "Connection terminated", the client-side "Query read timeout"), or said the
 * connection is going away (class 08, 57P01-57P03). A COMMIT the server answered with an
 * error of its own (a deferred constraint, a serialization failure, a statement timeout)
 * was rolled back: not unknown.
 */
function outcomeUnknown(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  const code = (err as { code?: unknown }).code;
  const sqlstate = typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
  return sqlstate === undefined || sqlstate.startsWith("08") || /^57P0[123]$/.test(sqlstate);
}

/** Mark on `err` that it is a COMMIT whose answer was lost, by server process `pid`. */
function mark(err: unknown, pid: number | undefined): void {
  if (err instanceof Error && outcomeUnknown(err))
    Object.defineProperty(err, LOST_COMMIT, { value: { pid } satisfies LostCommit, enumerable: true });
}

/**
 * Watch the COMMITs a pooled pg connection sends (and the writes it sends outside a
 * transaction, which commit themselves), marking those whose answer is lost (see
 * {@link LostCommit}). Installed on every PostgreSQL connection at creation (pg-bounds.ts).
 */
export function watchCommits(conn: PgClientLike): void {
  const query = conn.query.bind(conn);
  // Whether a transaction is open on this connection: outside one, a write commits itself
  // (autocommit), and a lost answer to it is a lost COMMIT as well.
  let inTransaction = false;
  conn.query = (config: unknown, ...rest: unknown[]) => {
    const text = textOf(config);
    let commits = false;
    if (/^\s*(begin|start transaction)\b/i.test(text)) inTransaction = true;
    else if (/^\s*(commit|rollback)\b/i.test(text) && !/^\s*rollback\s+to\b/i.test(text)) {
      commits = /^\s*commit\b/i.test(text);
      inTransaction = false;
    } else commits = !inTransaction && /^\s*(insert|update|delete)\b/i.test(text);
    if (!commits) return query(config, ...rest);
    // Read now: the process id is the connection's, and the connection may be gone later.
    const pid = typeof conn.processID === "number" ? conn.processID : undefined;
    const cb = rest[rest.length - 1];
    if (typeof cb === "function") {
      rest[rest.length - 1] = (err: unknown, res: unknown) => {
        if (err) mark(err, pid);
        (cb as (e: unknown, r: unknown) => void)(err, res);
      };
      return query(config, ...rest);
    }
    const result = query(config, ...rest);
    if (result instanceof Promise)
      return result.catch((err: unknown) => {
        mark(err, pid);
        throw err;
      });
    return result;
  };
}

/** The lost COMMIT `err` is (or wraps), if it is one. */
export function lostCommit(err: unknown): LostCommit | undefined {
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    const lost = (e as unknown as Record<string, unknown>)[LOST_COMMIT];
    if (lost !== undefined) return lost as LostCommit;
  }
  return undefined;
}

/** The answer to a call whose COMMIT was lost and whose outcome could not be settled. */
export function outcomeUnknownError(what?: { kind: string; id: string }): TesseraError {
  const subject = what ? `the ${what.kind} ${what.id}` : "the change";
  return new TesseraError(
    "UNAVAILABLE",
    `the database connection was lost while committing: ${subject} may or may not have been saved; check before retrying`,
    {
      headers: { "retry-after": "1" },
      metadata: { outcome: "unknown", ...(what ? { id: what.id } : {}) },
    },
  );
}

/** What {@link settleLostCommit} found. */
export type CommitOutcome = "applied" | "not-applied" | "unknown";

/** How long {@link settleLostCommit} tries, by default. */
export const SETTLE_TIMEOUT_MS = 3_000;

/**
 * Decide whether a lost COMMIT landed: on a fresh connection, wait until the server process
 * that ran the transaction is gone, ending it if it is still there (it is ours, and its
 * client is gone: an idle-in-transaction process would otherwise hold its locks until
 * PostgreSQL noticed; one caught mid-COMMIT finishes committing first, as PostgreSQL
 * commits in a critical section), then ask `probe` whether the change is there. Once the
 * process is gone, the answer is final. "unknown" when the database cannot be reached
 * within `timeoutMs`.
 *
 * A process id may be reused by a later session; ending one we did not mean to is possible
 * only if that happens within these few seconds, and costs that session one Unavailable.
 */
export async function settleLostCommit(
  storage: Storage,
  lost: LostCommit,
  probe: () => Promise<boolean>,
  timeoutMs = SETTLE_TIMEOUT_MS,
): Promise<CommitOutcome> {
  const deadline = Date.now() + timeoutMs;
  const conn = storage.em.getConnection();
  for (let pause = 25; ; pause = Math.min(pause * 2, 400)) {
    try {
      const alive =
        lost.pid !== undefined &&
        (await conn.execute("select 1 from pg_stat_activity where pid = ?", [lost.pid])).length > 0;
      if (!alive) return (await probe()) ? "applied" : "not-applied";
      // Ours to end, when the role may (its own sessions); else it is waited for.
      await conn.execute("select pg_terminate_backend(?)", [lost.pid]).catch(() => undefined);
    } catch (err) {
      if (!isOutage(err)) throw err;
    }
    if (Date.now() + pause > deadline) return "unknown";
    await sleep(pause);
  }
}

/**
 * Run `commit` (a flush or transaction that creates the object `what`), settling a lost
 * COMMIT: when the answer to its COMMIT is lost, whether the object was saved is found out
 * ({@link settleLostCommit}, `exists` asking for it by id) and the call goes on as if the
 * commit had answered: saved, the caller answers success (a secret shown once is shown);
 * not saved, the usual Unavailable (a retry is safe); undecidable, Unavailable naming the
 * object (`metadata.outcome = "unknown"`), for the client to check and revoke it.
 */
export async function commitCreation(
  storage: Storage,
  commit: () => Promise<unknown>,
  what: { kind: string; id: string },
  exists: () => Promise<boolean>,
): Promise<void> {
  try {
    await commit();
  } catch (err) {
    const lost = lostCommit(err);
    if (lost === undefined) throw err;
    const outcome = await settleLostCommit(storage, lost, exists);
    if (outcome === "applied") return;
    if (outcome === "not-applied")
      throw new TesseraError("UNAVAILABLE", "database unavailable", {
        headers: { "retry-after": "1" },
        cause: err,
      });
    throw outcomeUnknownError(what);
  }
}
