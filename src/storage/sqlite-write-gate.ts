import { AggregatedLog } from "../sdk/logger.js";
import { HOLD_BOUND_MS, type SqlitePoolQueue } from "./sqlite-pool-queue.js";
import type { SqliteGateLogger } from "./sqlite-read-gate.js";

/**
 * Keeps SQLite's raw writes (audit batches, last-used times, re-hashed secrets, stored
 * digests) out of the transactions the ORM holds open on the one shared connection: a
 * write inside one would commit or roll back with it, lost with a failed request's writes.
 *
 * With none open, a write runs at once (better-sqlite3 answers in the calling turn, before
 * any other BEGIN). With one open, it queues for the ORM's pool, which is first in, first
 * out: the transaction open now and those queued before it end first, and none queued after
 * it starts ahead. Polling for a moment with none open starved under back-to-back
 * transactions (a burst of refreshes): every write then waited out its bound and ran inside.
 * Bounded ({@link SqlitePoolQueue}): a write issued from within that very transaction (a
 * flush hook's) would wait on itself for ever; once the transaction holding the connection
 * is past its bound, the write runs inside it, counted and reported.
 */
export class SqliteWriteGate {
  private joinedCount = 0;
  private readonly joins: AggregatedLog;

  constructor(
    private readonly queue: SqlitePoolQueue,
    private readonly db: { readonly inTransaction: boolean },
    logger: SqliteGateLogger | undefined,
    now: () => number,
  ) {
    this.joins = new AggregatedLog(
      (fields) =>
        logger?.warn(
          { ...fields, joined: this.joinedCount, holdBoundMs: HOLD_BOUND_MS },
          "SQLite writes ran inside an open transaction held past its bound; they commit or roll back with it",
        ),
      now,
    );
  }

  /** Writes that ran inside another's open transaction (past the bound). */
  joined(): number {
    return this.joinedCount;
  }

  /** Run `write` (synchronous) once no ORM transaction is open on the connection. */
  async run<T>(write: () => T): Promise<T> {
    if (!this.db.inTransaction) return write();
    // A refused acquire (null: the pool closing) is the old behaviour: the write runs and fails or not.
    // No cap on the whole wait: only a stuck holder (past the hold bound) may have a write join
    // its transaction. A capped wait put writes into healthy transactions behind a burst once
    // database.connectTimeoutMs was short (25 ms: 3 of 8), to be lost if they rolled back; the
    // queue ahead is first in, first out, so the wait still ends (knex's pool gives up at 60 s).
    const conn = await this.queue.acquire(Number.POSITIVE_INFINITY);
    if (conn !== undefined && conn !== null) {
      try {
        if (!this.db.inTransaction) return write();
      } finally {
        await this.queue.release(conn);
      }
    }
    if (this.db.inTransaction) {
      this.joinedCount++;
      this.joins.add();
    }
    return write();
  }

  /** Write the open interval's report now (at close). */
  flush(): void {
    this.joins.flush();
  }
}
