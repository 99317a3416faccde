import { randomUUID } from "node:crypto";
import type { Logger } from "pino";
import { loggableError } from "./storage/errors.js";
import type { SqlRunner } from "./storage/sql.js";

/** One audit record: who did what to which id, and how it ended. Never a secret. */
export interface AuditRecord {
  requestId: string;
  tenantId: string | null;
  actorKind: string;
  actorId: string | null;
  action: string;
  targetId?: string | null;
  outcome: "success" | "failure";
  reason?: string | null;
  ip: string | null;
}

/** The audit log: buffered, written in batches off the request path, flushed at shutdown. */
export interface AuditLog {
  record(entry: AuditRecord): void;
  flush(): Promise<void>;
  close(): Promise<void>;
}

const INSERT =
  "insert into audit_events (id, at, request_id, tenant_id, actor_kind, actor_id, action, target_id, outcome, reason, ip) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/** Create the audit log over the raw SQL runner. */
export function createAuditLog(deps: { sql: SqlRunner; logger: Logger; flushMs?: number }): AuditLog {
  let queue: { at: Date; entry: AuditRecord }[] = [];
  let flushing: Promise<void> | null = null;
  const flushNow = async () => {
    const batch = queue;
    queue = [];
    for (const { at, entry } of batch) {
      try {
        await deps.sql.run(INSERT, [
          randomUUID(),
          at,
          entry.requestId,
          entry.tenantId,
          entry.actorKind,
          entry.actorId,
          entry.action,
          entry.targetId ?? null,
          entry.outcome,
          entry.reason ?? null,
          entry.ip,
        ]);
      } catch (err) {
        deps.logger.error({ err: loggableError(err), action: entry.action }, "audit write failed");
      }
    }
  };
  const flush = async () => {
    while (flushing) await flushing;
    if (queue.length === 0) return;
    flushing = flushNow().finally(() => {
      flushing = null;
    });
    await flushing;
  };
  const timer = setInterval(() => void flush(), deps.flushMs ?? 1000);
  timer.unref();
  return {
    record(entry) {
      queue.push({ at: new Date(), entry });
      deps.logger.info({ audit: entry }, "audit");
      if (queue.length >= 100) void flush();
    },
    flush,
    async close() {
      clearInterval(timer);
      await flush();
    },
  };
}
