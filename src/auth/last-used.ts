import type { Logger } from "pino";
import { loggableError } from "../storage/errors.js";
import type { SqlRunner } from "../storage/sql.js";

/**
 * Coalesces "last used at" updates: a credential used a thousand times a second costs
 * one write per flush interval, not one per request. Flushed every `intervalSeconds`
 * (at most 60, so the value is never more than a minute stale) and at shutdown.
 */
export class LastUsedTracker {
  private pending = new Map<string, { table: string; id: string; at: Date }>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly sql: SqlRunner,
    private readonly logger: Logger,
    intervalSeconds: number,
  ) {
    this.timer = setInterval(() => void this.flush(), Math.min(60, intervalSeconds) * 1000);
    this.timer.unref();
  }

  /** Record a use of row `id` in `table` (a fixed table name, never user input). */
  mark(table: string, id: string, at = new Date()): void {
    this.pending.set(`${table}\0${id}`, { table, id, at });
  }

  /** Write everything pending. */
  async flush(): Promise<void> {
    if (this.pending.size === 0) return;
    const batch = [...this.pending.values()];
    this.pending = new Map();
    for (const { table, id, at } of batch) {
      try {
        // Never move the time backwards when several instances flush.
        await this.sql.run(
          `update ${table} set last_used_at = ? where id = ? and (last_used_at is null or last_used_at < ?)`,
          [at, id, at],
        );
      } catch (err) {
        this.logger.warn({ err: loggableError(err), table }, "last-used flush failed");
      }
    }
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.flush();
  }
}
