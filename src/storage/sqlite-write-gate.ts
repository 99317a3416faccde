import { acquireWithin, type SqlitePoolClient } from "./sqlite-read-gate.js";

/** Where a write that had to join an open transaction is reported (without its statement). */
export interface SqliteWriteGateLogger {
  warn(obj: object, msg: string): void;
}

/** How long a raw write waits for the ORM's open transaction to end (see {@link SqliteWriteGate}). */
export const RAW_WRITE_WAIT_MS = 1000;
/** At most one warning per this many milliseconds about writes that joined a transaction. */
const WARN_EVERY_MS = 10_000;

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
 * Bounded: a write issued from within that very transaction (a flush hook's) would wait on
 * itself for ever; past the bound it runs inside it, counted and reported.
 */
export class SqliteWriteGate {
  private joinedCount = 0;
  private warnedAt = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly client: SqlitePoolClient,
    private readonly db: { readonly inTransaction: boolean },
    private readonly logger?: SqliteWriteGateLogger,
    private readonly waitMs = RAW_WRITE_WAIT_MS,
  ) {}

  /** Writes that ran inside another's open transaction (past the bound). */
  joined(): number {
    return this.joinedCount;
  }

  /** Run `write` (synchronous) once no ORM transaction is open on the connection. */
  async run<T>(write: () => T): Promise<T> {
    if (!this.db.inTransaction) return write();
    // A refused acquire (null: the pool closing) is the old behaviour: the write runs and fails or not.
    const conn = await acquireWithin(this.client, this.waitMs);
    if (conn !== undefined && conn !== null) {
      try {
        if (!this.db.inTransaction) return write();
      } finally {
        await this.client.releaseConnection(conn);
      }
    }
    if (this.db.inTransaction) this.report();
    return write();
  }

  private report(): void {
    this.joinedCount++;
    const now = Date.now();
    if (now - this.warnedAt < WARN_EVERY_MS) return;
    this.warnedAt = now;
    this.logger?.warn(
      { joined: this.joinedCount, waitedMs: this.waitMs },
      "a SQLite write ran inside an open transaction after waiting for it; it commits or rolls back with it",
    );
  }
}
