import { TransactionContext } from "@mikro-orm/core";
import type { Awaitable } from "../auth/awaitable.js";
import { TesseraError } from "../errors.js";
import { AggregatedLog } from "../sdk/logger.js";
import { HOLD_BOUND_MS, type SqlitePoolQueue } from "./sqlite-pool-queue.js";

/** Whether the caller runs inside an ORM transaction (`em.transactional`) that has not ended yet. */
export function ownsOpenTransaction(): boolean {
  const trx = TransactionContext.getEntityManager()?.getTransactionContext<{ isCompleted?(): boolean }>();
  return trx?.isCompleted?.() === false;
}

/** Where the gates report what they refused or let through (without statements). */
export interface SqliteGateLogger {
  warn(obj: object, msg: string): void;
}

/**
 * Keeps the raw reads of SQLite's one connection (shared with the ORM) off another request's
 * uncommitted writes.
 *
 * Why: a transaction the ORM holds open across awaits (its statements are awaited, so other
 * requests' promise chains run in between even within one event-loop turn) shows its writes to
 * every statement on the connection. A re-enable, a grant or a new credential row that is
 * then rolled back would admit a request on state that never existed; revocation is exact and
 * authority bounded for committed state only. So a read issued while a transaction is open
 * queues for the ORM's pool (first in, first out: polling for a moment with none open starves
 * under back-to-back transactions) and reads holding the connection, unless the transaction is
 * the caller's own (same async context: it must see its own writes, and would wait on itself).
 * The wait is bounded ({@link SqlitePoolQueue}): once the transaction holding the connection
 * is past its bound, the read is refused with Unavailable and Retry-After, a fault to retry,
 * never a dirty answer.
 *
 * Not a second connection (a WAL snapshot): an in-memory database has only the one, and the
 * state cache's triggers and data_version are per connection.
 */
export class SqliteReadGate {
  /** Reads that waited for another request's transaction to end. */
  held = 0;
  /** Reads refused because that transaction outlasted the bound. */
  refused = 0;
  private readonly refusals: AggregatedLog;

  constructor(
    private readonly queue: SqlitePoolQueue,
    private readonly db: { readonly inTransaction: boolean },
    logger: SqliteGateLogger | undefined,
    now: () => number,
  ) {
    this.refusals = new AggregatedLog(
      (fields) =>
        logger?.warn(
          { ...fields, refused: this.refused, holdBoundMs: HOLD_BOUND_MS },
          "state reads were refused (Unavailable): another request's transaction held SQLite's connection past its bound",
        ),
      now,
    );
  }

  /** Whether a read now sees only committed rows, or the caller's own transaction's. */
  readable(): boolean {
    return !this.db.inTransaction || ownsOpenTransaction();
  }

  /** `read` now when {@link readable}, else once no other transaction is open. */
  gate<T>(read: () => Awaitable<T>): Awaitable<T> {
    return this.readable() ? read() : this.afterCommit(read);
  }

  /** `read` (synchronous on SQLite), run holding the pool's connection once the open transaction has let it go. */
  async afterCommit<T>(read: () => Awaitable<T>): Promise<T> {
    this.held++;
    const conn = await this.queue.acquire();
    if (conn === undefined) throw this.refuse();
    // A refused acquire (the pool closing): read only if no transaction is open.
    if (conn === null) {
      if (this.db.inTransaction) throw this.refuse();
      return read();
    }
    try {
      // Holding the one connection: no transaction can begin until this read has run.
      if (!this.db.inTransaction) return await read();
    } finally {
      await this.queue.release(conn);
    }
    throw this.refuse();
  }

  /** Write the open interval's report now (at close). */
  flush(): void {
    this.refusals.flush();
  }

  private refuse(): TesseraError {
    this.refused++;
    this.refusals.add();
    return new TesseraError("UNAVAILABLE", "database busy", { headers: { "retry-after": "1" } });
  }
}
