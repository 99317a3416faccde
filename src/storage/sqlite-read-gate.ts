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

/**
 * Keeps the raw reads of SQLite's one connection (shared with the ORM) off another request's
 * uncommitted writes.
 *
 * Why: a transaction the ORM holds open across awaits (its statements are awaited, so other
 * requests' promise chains run in between even within one event-loop turn) shows its writes to
 * every statement on the connection. A re-enable, a grant or a new credential row that is
 * then rolled back would admit a request on state that never existed; revocation is exact and
 * authority bounded for committed state only. So a read issued while a transaction is open
 * waits for it to end, unless the transaction is the caller's own (same async context: it must
 * see its own writes, and waiting would wait on itself). The wait is bounded: past it the read
 * is refused with Unavailable and Retry-After, a fault to retry, never a dirty answer.
 *
 * Not a second connection (a WAL snapshot): an in-memory database has only the one, and the
 * state cache's triggers and data_version are per connection.
 */
export class SqliteReadGate {
  /** Reads that waited for another request's transaction to end. */
  held = 0;
  /** Reads refused because that transaction outlasted the bound. */
  refused = 0;

  constructor(
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

  /** `read`, run in the turn that finds no other request's transaction open (the caller's is not: see gate). */
  async afterCommit<T>(read: () => Awaitable<T>): Promise<T> {
    this.held++;
    const until = Date.now() + this.waitMs;
    // One turn first: the ORM's transactions on SQLite usually end within the turn they began in.
    await new Promise((resolve) => setImmediate(resolve));
    while (!this.readable()) {
      if (Date.now() >= until) {
        this.refused++;
        this.logger?.warn(
          { waitMs: this.waitMs, refused: this.refused },
          "a state read was refused: another request's transaction stayed open past the bound",
        );
        throw new TesseraError("UNAVAILABLE", "database busy", { headers: { "retry-after": "1" } });
      }
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    return read();
  }
}
