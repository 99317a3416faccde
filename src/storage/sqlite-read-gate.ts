import { TransactionContext } from "@mikro-orm/core";
import type { Awaitable } from "../auth/awaitable.js";
import { TesseraError } from "../errors.js";

/** How long a raw read on SQLite waits for another request's transaction to end (see {@link SqliteReadGate}). */
export const READ_WAIT_MS = 1000;

/** Whether the caller runs inside an ORM transaction (`em.transactional`) that has not ended yet. */
export function ownsOpenTransaction(): boolean {
  const trx = TransactionContext.getEntityManager()?.getTransactionContext<{ isCompleted?(): boolean }>();
  return trx?.isCompleted?.() === false;
}

/** The knex client of the ORM's SQLite pool (one connection): acquire and release it. */
export interface SqlitePoolClient {
  acquireConnection(): Promise<unknown>;
  releaseConnection(conn: unknown): Promise<unknown>;
}

/**
 * The pool's one connection, acquired in its first-in, first-out queue: the connection once
 * the transaction open now (and those queued before) let it go; `undefined` past `waitMs`
 * (the acquire still pending is handed back when it comes); `null` when the pool refused.
 */
export async function acquireWithin(client: SqlitePoolClient, waitMs: number): Promise<unknown> {
  const acquiring = client.acquireConnection().catch(() => null);
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((resolve) => {
    timer = setTimeout(resolve, waitMs, undefined);
  });
  const conn = await Promise.race([acquiring, late]);
  clearTimeout(timer);
  if (conn === undefined) void acquiring.then((c) => (c === null ? undefined : client.releaseConnection(c)));
  return conn;
}

/** At most one warning per this many milliseconds about refused reads. */
const WARN_EVERY_MS = 10_000;

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
 * The wait is bounded: past it the read is refused with Unavailable and Retry-After, a fault
 * to retry, never a dirty answer.
 *
 * Not a second connection (a WAL snapshot): an in-memory database has only the one, and the
 * state cache's triggers and data_version are per connection.
 */
export class SqliteReadGate {
  /** Reads that waited for another request's transaction to end. */
  held = 0;
  /** Reads refused because that transaction outlasted the bound. */
  refused = 0;
  private warnedAt = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly client: SqlitePoolClient,
    private readonly db: { readonly inTransaction: boolean },
    private readonly waitMs: number,
    private readonly logger?: { warn(obj: object, msg: string): void },
  ) {}

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
    const conn = await acquireWithin(this.client, this.waitMs);
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
      await this.client.releaseConnection(conn);
    }
    throw this.refuse();
  }

  private refuse(): TesseraError {
    this.refused++;
    const now = Date.now();
    if (now - this.warnedAt >= WARN_EVERY_MS) {
      this.warnedAt = now;
      this.logger?.warn(
        { refused: this.refused, waitMs: this.waitMs },
        "a state read was refused (Unavailable): another request's transaction stayed open past its bound",
      );
    }
    return new TesseraError("UNAVAILABLE", "database busy", { headers: { "retry-after": "1" } });
  }
}
