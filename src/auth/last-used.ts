import type { Logger } from "pino";
import { isContentError, loggableError } from "../storage/errors.js";
import type { CredentialRepository, LastUsedTable } from "../storage/repositories/credentials.js";

/**
 * Rows a flush writes per event-loop turn. SQLite (better-sqlite3) answers each update in the
 * calling turn, a commit each (~0.1 ms): without a turn between, a flush of every credential
 * used in the interval held the loop for all of them at once (10,000 credentials: about a
 * second, every `lastUsedFlushSeconds`). 16 is the audit log's bound (SYNC_AUDIT_BATCH) too.
 */
export const LAST_USED_ROWS_PER_TURN = 16;

/** What the last-used tracker has done since start (for metrics and tests). */
export interface LastUsedStats {
  /** Credentials whose last use waits to be written. */
  depth: number;
  /** Uses not kept because `maxPending` credentials were already waiting (or refused rows). */
  dropped: number;
  /** Rows written. */
  written: number;
  /** Failed flushes (retried with backoff). */
  failures: number;
}

/** Options of {@link LastUsedTracker} beyond the flush interval. */
export interface LastUsedOptions {
  /** Credentials waiting at most (default 100,000); a use of one more is dropped and counted. */
  maxPending?: number;
  /** First retry after a failed flush, doubling up to `maxBackoffMs` (defaults 250 ms, 30 s). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
}

/**
 * Coalesces "last used at" updates: a credential used a thousand times a second costs
 * one write per flush interval, not one per request. Flushed every `intervalSeconds`
 * (at most 60, so the value is never more than a minute stale) and at shutdown. A flush
 * that fails because the database is away keeps what it could not write (a newer use
 * wins) and is retried with exponential backoff, so an outage loses no last-used time.
 */
export class LastUsedTracker {
  private pending = new Map<string, { table: LastUsedTable; id: string; at: Date }>();
  private readonly timer: NodeJS.Timeout;
  private retry: NodeJS.Timeout | undefined;
  private backoff = 0;
  private running: Promise<boolean> | null = null;
  private readonly counters = { dropped: 0, written: 0, failures: 0 };
  /** Drops of the current overflow episode (logged once when it starts, like the audit buffer's). */
  private overflowing = false;
  /** The drops counted when close ended (-1 before): the first use marked after it is logged. */
  private droppedAtClose = -1;
  private readonly maxPending: number;
  private readonly minBackoff: number;
  private readonly maxBackoff: number;

  constructor(
    private readonly credentials: Pick<CredentialRepository, "markUsed">,
    private readonly logger: Logger,
    intervalSeconds: number,
    options: LastUsedOptions = {},
  ) {
    this.maxPending = options.maxPending ?? 100_000;
    this.minBackoff = options.minBackoffMs ?? 250;
    this.maxBackoff = options.maxBackoffMs ?? 30_000;
    this.timer = setInterval(() => void this.flush(), Math.min(60, intervalSeconds) * 1000);
    this.timer.unref();
  }

  /** Record a use of row `id` in `table` (a fixed table name, never user input). */
  mark(table: LastUsedTable, id: string, at = new Date()): void {
    if (this.droppedAtClose >= 0) {
      // A call cut at shutdown that ends after close: nothing writes what is pending any more.
      if (this.counters.dropped++ === this.droppedAtClose)
        this.logger.error({ table }, "last-used time marked after the tracker closed: dropped (counted)");
      return;
    }
    const key = `${table}\0${id}`;
    const current = this.pending.get(key);
    if (current === undefined && this.pending.size >= this.maxPending) {
      this.counters.dropped++;
      if (!this.overflowing) {
        this.overflowing = true;
        this.logger.error(
          { maxPending: this.maxPending, dropped: this.counters.dropped },
          "last-used buffer full: uses are being dropped (counted in tessera_last_used_dropped_total) until it drains",
        );
      }
      return;
    }
    if (current === undefined || current.at < at) this.pending.set(key, { table, id, at });
  }

  /** Counters and how many credentials wait. */
  stats(): LastUsedStats {
    return { depth: this.pending.size, ...this.counters };
  }

  /**
   * Write everything pending; resolves true when it all was written. What fails for want
   * of a database stays pending and is retried with backoff (and by the next flush).
   */
  async flush(): Promise<boolean> {
    if (this.running) await this.running;
    if (this.pending.size === 0) return true;
    this.running = this.write().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async write(): Promise<boolean> {
    const batch = [...this.pending.entries()];
    this.pending = new Map();
    for (let i = 0; i < batch.length; i++) {
      if (i > 0 && i % LAST_USED_ROWS_PER_TURN === 0) await new Promise((resolve) => setImmediate(resolve));
      const [, { table, id, at }] = batch[i]!;
      try {
        await this.credentials.markUsed(table, id, at);
        this.counters.written++;
      } catch (err) {
        if (isContentError(err)) {
          this.counters.dropped++;
          this.logger.warn({ err: loggableError(err), table }, "last-used time refused by the database");
          continue;
        }
        this.counters.failures++;
        // Put back what is left, unless a newer use came meanwhile.
        for (const [k, entry] of batch.slice(i)) {
          const newer = this.pending.get(k);
          if (newer === undefined || newer.at < entry.at) this.pending.set(k, entry);
        }
        if (this.backoff === 0)
          this.logger.warn(
            { err: loggableError(err), table, pending: this.pending.size },
            "last-used times cannot be written; kept and retried",
          );
        this.backoff = this.backoff === 0 ? this.minBackoff : Math.min(this.maxBackoff, this.backoff * 2);
        if (!this.retry) {
          this.retry = setTimeout(
            () => {
              this.retry = undefined;
              void this.flush();
            },
            this.backoff * (0.75 + Math.random() / 2),
          );
          this.retry.unref();
        }
        return false;
      }
    }
    if (this.backoff > 0) this.logger.info("last-used times are written again");
    this.backoff = 0;
    if (this.overflowing && this.pending.size < this.maxPending / 2) this.overflowing = false;
    return true;
  }

  /**
   * Shutdown: stop the timers and write what is pending, retrying with backoff for up to
   * `deadlineMs`; what is still unwritten then is logged as lost. `App.close()` calls it.
   */
  async close(deadlineMs = 10_000): Promise<void> {
    clearInterval(this.timer);
    clearTimeout(this.retry);
    this.retry = undefined;
    const deadline = Date.now() + deadlineMs;
    let wait = this.minBackoff;
    for (;;) {
      const written = await this.flush();
      // Uses marked while that write ran (calls still ending) are written by another turn:
      // the database answered, so they are not lost while the deadline allows.
      if (written && this.pending.size === 0) break;
      if (written) {
        if (Date.now() >= deadline) break;
        continue;
      }
      clearTimeout(this.retry);
      this.retry = undefined;
      if (Date.now() + wait >= deadline) break;
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(this.maxBackoff, wait * 2);
    }
    clearTimeout(this.retry);
    this.retry = undefined;
    if (this.pending.size > 0) {
      this.counters.dropped += this.pending.size;
      this.logger.error({ lost: this.pending.size }, "last-used times could not be written before shutdown");
      this.pending.clear();
    }
    this.droppedAtClose = this.counters.dropped;
  }
}
