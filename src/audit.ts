import type { Logger } from "pino";
import type { AccessLog } from "./access-log.js";
import { type Clock, systemClock } from "./clock.js";
import { isContentError, loggableError } from "./storage/errors.js";
import {
  type AuditEventRepository,
  type AuditEventRow,
  MAX_AUDIT_BATCH,
} from "./storage/repositories/audit.js";
import { uuidV7 } from "./storage/uuid-v7.js";

/**
 * One audit record: who did what to which id, and how it ended; the row it becomes
 * ({@link AuditEventRow}) but for the id and time the buffer gives it. Never a secret.
 */
export interface AuditRecord extends Omit<AuditEventRow, "id" | "at" | "targetId" | "outcome" | "reason"> {
  targetId?: string | null;
  outcome: "success" | "failure";
  reason?: string | null;
}

/** What the audit buffer has done since start (for metrics and tests). */
export interface AuditStats {
  /** Events waiting in memory to be written. */
  depth: number;
  /** Events lost: the buffer was full when they came, or the database refused the row itself. */
  dropped: number;
  /** Events written to `audit_events`. */
  written: number;
  /** Failed write attempts (each one retried later, with backoff). */
  failures: number;
}

/**
 * The audit log: events are kept in a bounded in-memory buffer and written off the request
 * path in multi-row inserts. A write that fails because the database is away is retried
 * with exponential backoff, so events of calls made during an outage reach `audit_events`
 * once it is back; only an overflowing buffer loses events, and that is counted and logged.
 */
export interface AuditLog {
  /** Buffer one event (never blocks, never throws). */
  record(entry: AuditRecord): void;
  /**
   * Write what is buffered now, without waiting for a pending backoff. Resolves once the
   * buffer is empty or an attempt failed (the events stay buffered and are retried).
   */
  flush(): Promise<void>;
  /**
   * Shutdown: stop the timers and write everything buffered, retrying with backoff for up
   * to `deadlineMs` (default: the `closeTimeoutMs` option). What is still unwritten then
   * is logged as lost. Called by `App.close()`, and so by the server's shutdown.
   */
  close(deadlineMs?: number): Promise<void>;
  /** Counters and the buffer's depth. */
  stats(): AuditStats;
  /** Delete events older than the retention period now, in batches; returns how many. */
  purgeExpired(now?: Date): Promise<number>;
}

/** Options of {@link createAuditLog}. */
export interface AuditLogOptions {
  events: Pick<AuditEventRepository, "insert" | "deleteBefore"> &
    Partial<Pick<AuditEventRepository, "batchRows">>;
  logger: Logger;
  /** Events kept in memory at most (`audit.bufferSize`); past it new events are dropped and counted. */
  bufferSize?: number;
  /** How often buffered events are written while the database answers (default 1000 ms). */
  flushMs?: number;
  /** First retry delay after a failed write; doubles up to `maxBackoffMs` (defaults 250 ms, 30 s). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /** How long `close()` keeps retrying (default 10 s). */
  closeTimeoutMs?: number;
  /** Days events are kept (`audit.retentionDays`); 0 keeps them forever. */
  retentionDays?: number;
  /** How often expired events are deleted (default hourly; the first run a minute after start). */
  retentionIntervalMs?: number;
  /** Rows deleted per statement by retention (default 1000). */
  retentionBatch?: number;
  /** The clock of an event's time and of the retention cut-off (default: the machine's; tests pass a manual one). */
  clock?: Clock;
  /**
   * Where each record's log line goes (default: `logger.info({ audit }, "audit")`).
   * `tessera serve` passes {@link auditLineTo} its access log's buffered writer.
   */
  line?: (entry: AuditRecord) => void;
}

/**
 * Audit lines through a buffered line writer (the access log's of `tessera serve`), in the
 * service logger's format (`level`, `time`, `service`, `audit`, `msg`), at info under the
 * writer's level. Built as one string and written with the access lines, asynchronously:
 * through pino each VerifyCredential paid for a serialisation and a write of its own
 * (bench/results/2026-12-05-verify-p99.md). A record holds no secret by construction, so the
 * logger's redaction has nothing to do on it.
 */
export function auditLineTo(log: AccessLog): (entry: AuditRecord) => void {
  return (entry) => {
    if (!log.isLevelEnabled("info")) return;
    log.writeLine(
      `{"level":30,"time":${Date.now()},"service":"tessera","audit":${JSON.stringify(entry)},"msg":"audit"}\n`,
    );
  };
}

/** Where a flush starts early, without waiting for the timer. */
const EAGER_DEPTH = 100;

interface Buffered {
  id: string;
  at: Date;
  entry: AuditRecord;
}

/** A string cut to a column's width (the audit table's columns are bounded; a longer value would lose the row). */
function cut(value: string | null | undefined, max: number): string | null {
  if (value === null || value === undefined) return null;
  return value.length > max ? value.slice(0, max) : value;
}

/** Create the audit log over the audit events' repository. */
export function createAuditLog(options: AuditLogOptions): AuditLog {
  const { events, logger } = options;
  const clock = options.clock ?? systemClock;
  const bufferSize = options.bufferSize ?? 100_000;
  const flushMs = options.flushMs ?? 1000;
  const minBackoff = options.minBackoffMs ?? 250;
  const maxBackoff = options.maxBackoffMs ?? 30_000;
  const closeTimeoutMs = options.closeTimeoutMs ?? 10_000;
  const retentionDays = options.retentionDays ?? 0;
  const retentionBatch = options.retentionBatch ?? 1000;
  const line = options.line ?? ((entry: AuditRecord) => logger.info({ audit: entry }, "audit"));

  let buffer: Buffered[] = [];
  const counters = { dropped: 0, written: 0, failures: 0 };
  /** Current backoff; 0 while writes succeed. */
  let backoff = 0;
  /** Failures of the current outage (logged once when it starts, summed up when it ends). */
  let outageFailures = 0;
  /** Drops of the current overflow episode (logged once when it starts). */
  let overflowing = false;
  /**
   * Rows per insert: the repository's bound (SQLite writes in the calling turn, so a batch
   * there is time no request is answered), else the statement's.
   */
  const maxBatch = Math.max(1, Math.min(MAX_AUDIT_BATCH, events.batchRows ?? MAX_AUDIT_BATCH));
  /** Rows per insert for the next attempt: halved while a batch is refused for its content. */
  let batchLimit = maxBatch;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<boolean> | null = null;
  let closed = false;
  /** The drops counted when close ended (-1 before): the first event recorded after it is logged. */
  let droppedAtClose = -1;

  const schedule = (ms: number) => {
    if (timer || closed) return;
    timer = setTimeout(() => {
      timer = undefined;
      void pump();
    }, ms);
    timer.unref();
  };

  const row = (b: Buffered): AuditEventRow => ({
    id: b.id,
    at: b.at,
    requestId: cut(b.entry.requestId, 64) ?? "",
    tenantId: cut(b.entry.tenantId, 36),
    actorOutside: b.entry.actorOutside,
    actorKind: cut(b.entry.actorKind, 32) ?? "",
    actorId: cut(b.entry.actorId, 64),
    action: cut(b.entry.action, 128) ?? "",
    targetId: cut(b.entry.targetId, 64),
    outcome: b.entry.outcome,
    reason: cut(b.entry.reason, 64),
    ip: cut(b.entry.ip, 64),
  });

  /** One write attempt of the buffer's head; false when it failed for want of a database. */
  const writeHead = async (): Promise<boolean> => {
    // Batches of a power of two: a handful of distinct statements, each prepared once (SQLite).
    let n = Math.min(buffer.length, batchLimit);
    n = 2 ** Math.floor(Math.log2(n));
    const batch = buffer.slice(0, n);
    try {
      await events.insert(batch.map(row));
    } catch (err) {
      counters.failures++;
      if (isContentError(err)) {
        if (n > 1) {
          // A batch refused for what it holds: find the row by halving, while the rest goes through.
          batchLimit = n >> 1;
          return true;
        }
        // One row the database refuses whatever its state: it can never be written.
        buffer.splice(0, 1);
        counters.dropped++;
        logger.error(
          { err: loggableError(err), action: batch[0]!.entry.action },
          "audit event refused by the database",
        );
        return true;
      }
      // Anything else is taken for the database's state (away, busy, full): kept and retried.
      // (Dropping on an error not recognised would lose a whole outage's events.)
      if (outageFailures++ === 0)
        logger.warn(
          { err: loggableError(err), depth: buffer.length },
          "audit events cannot be written; kept in memory and retried",
        );
      return false;
    }
    buffer.splice(0, n);
    counters.written += n;
    if (n === batchLimit || buffer.length === 0) batchLimit = maxBatch;
    if (outageFailures > 0) {
      logger.info({ failures: outageFailures, depth: buffer.length }, "audit events are written again");
      outageFailures = 0;
    }
    backoff = 0;
    if (overflowing && buffer.length < bufferSize / 2) overflowing = false;
    return true;
  };

  /** Write until the buffer is empty or an attempt fails; then retry with backoff. */
  const pump = (): Promise<boolean> => {
    if (running) return running;
    running = (async () => {
      let batches = 0;
      while (buffer.length > 0) {
        // One batch per event-loop turn: an insert's continuation is a microtask, so without
        // this the whole buffer would be written before any waiting request was answered.
        if (batches++ > 0) await new Promise((resolve) => setImmediate(resolve));
        if (!(await writeHead())) {
          backoff = backoff === 0 ? minBackoff : Math.min(maxBackoff, backoff * 2);
          // Jitter: instances that lost the database together do not come back in step.
          schedule(backoff * (0.75 + Math.random() / 2));
          return false;
        }
      }
      return true;
    })().finally(() => {
      running = null;
    });
    return running;
  };

  const purgeExpired = async (now = new Date(clock())): Promise<number> => {
    if (retentionDays <= 0) return 0;
    const cutoff = new Date(now.getTime() - retentionDays * 86_400_000);
    let total = 0;
    for (;;) {
      const n = await events.deleteBefore(cutoff, retentionBatch);
      total += n;
      if (n < retentionBatch) return total;
      await new Promise((resolve) => setImmediate(resolve));
    }
  };

  let retentionTimer: NodeJS.Timeout | undefined;
  if (retentionDays > 0) {
    const interval = options.retentionIntervalMs ?? 3_600_000;
    const run = () => {
      purgeExpired()
        .then((n) => {
          if (n > 0) logger.info({ deleted: n, retentionDays }, "expired audit events deleted");
        })
        .catch((err: unknown) =>
          logger.warn({ err: loggableError(err) }, "audit retention failed; tried again later"),
        )
        .finally(() => {
          if (closed) return;
          retentionTimer = setTimeout(run, interval);
          retentionTimer.unref();
        });
    };
    retentionTimer = setTimeout(run, Math.min(interval, 60_000));
    retentionTimer.unref();
  }

  return {
    record(entry) {
      line(entry);
      if (droppedAtClose >= 0) {
        // A call cut at shutdown that ends after close: nothing writes the buffer any more
        // (one recorded while close still writes is written by it).
        if (counters.dropped++ === droppedAtClose)
          logger.error(
            { action: entry.action },
            "audit event recorded after the audit log closed: dropped (counted in the audit stats)",
          );
        return;
      }
      if (buffer.length >= bufferSize) {
        counters.dropped++;
        if (!overflowing) {
          overflowing = true;
          logger.error(
            { bufferSize, dropped: counters.dropped },
            "audit buffer full: events are being dropped (counted in the audit stats) until it drains",
          );
        }
        return;
      }
      // Time-ordered ids: rows append to the primary key's index (see uuidV7).
      const now = clock();
      buffer.push({ id: uuidV7(now), at: new Date(now), entry });
      if (backoff > 0) return; // the retry timer is set
      if (buffer.length >= EAGER_DEPTH) void pump();
      else schedule(flushMs);
    },
    async flush() {
      if (timer) {
        clearTimeout(timer);
        timer = undefined;
      }
      // A pump already running may have started before the latest events: run once more.
      await pump();
      if (buffer.length > 0 && backoff === 0) await pump();
    },
    async close(deadlineMs = closeTimeoutMs) {
      clearTimeout(retentionTimer);
      const deadline = Date.now() + deadlineMs;
      if (timer) {
        clearTimeout(timer);
        timer = undefined;
      }
      closed = true;
      let wait = minBackoff;
      while (buffer.length > 0) {
        // An event recorded as the last write ended (a call still ending) is written by
        // another turn: the database answered, so it is not lost while the deadline allows.
        if (await pump()) {
          if (Date.now() >= deadline) break;
          continue;
        }
        if (Date.now() + wait >= deadline) break;
        await new Promise((resolve) => setTimeout(resolve, wait));
        wait = Math.min(maxBackoff, wait * 2);
      }
      if (buffer.length > 0) {
        counters.dropped += buffer.length;
        logger.error({ lost: buffer.length }, "audit events could not be written before shutdown");
        buffer = [];
      }
      droppedAtClose = counters.dropped;
    },
    stats: () => ({ depth: buffer.length, ...counters }),
    purgeExpired,
  };
}
