import { performance } from "node:perf_hooks";

/**
 * How long one holder (an ORM transaction) may keep SQLite's one connection before the raw
 * reads and writes waiting for it stop waiting (see {@link SqlitePoolQueue}).
 */
export const HOLD_BOUND_MS = 1000;

/** The knex client of the ORM's SQLite pool (one connection): acquire and release it. */
export interface SqlitePoolClient {
  acquireConnection(): Promise<unknown>;
  releaseConnection(conn: unknown): Promise<unknown>;
}

/** The pool under it (tarn's, `client.pool`): told of each hand-over of the connection. */
export interface SqlitePoolEvents {
  on(event: "acquireSuccess", listener: () => void): unknown;
}

/** Bounds of a {@link SqlitePoolQueue} wait, in ms. */
export interface SqliteWaitBounds {
  /** How long the holder may keep the connection (its transaction's age). */
  holdMs: number;
  /**
   * How long one wait may last in all, however the queue ahead of it moves: the storage's
   * `database.connectTimeoutMs`, PostgreSQL's bound on waiting for a free pooled connection.
   */
  maxWaitMs: number;
}

/**
 * A place in the ORM's pool queue (first in, first out), for raw SQL that must run with no
 * transaction open on the one connection, bounded on what is wrong rather than on the wait.
 *
 * Why on the holder's age: a bound on the time queued refused reads (and pushed writes into
 * a transaction) behind a burst of short transactions, none of them stuck: a thousand of a
 * few ms each are seconds of queue that keeps moving. A transaction that has held the
 * connection past `holdMs` is what is wrong (stuck, or slow past what a request may take):
 * once the one holding it now has, the wait ends, at once for a caller that finds it so.
 * Every hand-over starts the bound again; `maxWaitMs` caps the whole wait all the same.
 * A holder is a transaction from its connection's acquire to its release (knex holds the
 * connection for the whole transaction), so its age is the transaction's.
 */
export class SqlitePoolQueue {
  /** When the connection's current holder acquired it (performance.now()). */
  private heldSince = performance.now();

  constructor(
    private readonly client: SqlitePoolClient,
    pool: SqlitePoolEvents,
    private readonly bounds: SqliteWaitBounds,
  ) {
    pool.on("acquireSuccess", () => {
      this.heldSince = performance.now();
    });
  }

  /**
   * The connection once the holder and those queued before have let it go; `undefined` once
   * the holder of the moment has held it `holdMs` (or the wait reached `maxWaitMs`, by default
   * the bounds'), the acquire
   * still pending then handed back when it comes; `null` when the pool refused (closing).
   */
  async acquire(maxWaitMs = this.bounds.maxWaitMs): Promise<unknown> {
    const started = performance.now();
    if (started - this.heldSince >= this.bounds.holdMs) return undefined;
    const acquiring = this.client.acquireConnection().catch(() => null);
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<undefined>((resolve) => {
      // One timer per wait, moved on at each expiry to the holder of the moment's bound.
      const check = () => {
        const now = performance.now();
        const due = Math.min(this.heldSince + this.bounds.holdMs, started + maxWaitMs);
        if (now >= due) resolve(undefined);
        else timer = setTimeout(check, Math.ceil(due - now));
      };
      check();
    });
    const conn = await Promise.race([acquiring, late]);
    clearTimeout(timer);
    if (conn === undefined)
      void acquiring.then((c) => (c === null ? undefined : this.client.releaseConnection(c)));
    return conn;
  }

  /** Hand back a connection {@link acquire} returned. */
  async release(conn: unknown): Promise<void> {
    await this.client.releaseConnection(conn);
  }
}
