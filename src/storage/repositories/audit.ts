import { type SqlRunner, toMillis } from "../sql.js";

/** One audit event as stored, ready for `audit_events` (values already cut to the columns' widths). */
export interface AuditEventRow {
  id: string;
  at: Date;
  requestId: string;
  /** The tenant the record is filed in, so read by its `admin:audit` holders: see auditFiling (admission/audit.ts). */
  tenantId: string | null;
  /**
   * The actor is not of `tenantId` (a `*` principal acting on another tenant's object, the
   * static admin token): that tenant's readers see it as the platform, never by its id.
   */
  actorOutside: boolean;
  actorKind: string;
  actorId: string | null;
  action: string;
  targetId: string | null;
  outcome: string;
  reason: string | null;
  ip: string | null;
}

/** An audit event as read back; `at` in epoch ms. */
export interface StoredAuditEvent extends Omit<AuditEventRow, "at"> {
  at: number;
}

/** What {@link AuditEventRepository.list} keeps: every field set must match (null or absent: any). */
export interface AuditEventFilter {
  tenantId?: string | null;
  actorId?: string | null;
  /** Only events whose actor is (true) or is not (false) of another tenant than the event's. */
  actorOutside?: boolean | null;
  action?: string | null;
  outcome?: string | null;
  targetId?: string | null;
  requestId?: string | null;
  /** Events at or after this time. */
  start?: Date | null;
  /** Events before this time. */
  end?: Date | null;
  /** Resume after this event in the list's order (newest first, ties by id descending). */
  after?: { at: number; id: string } | null;
}

const COLUMNS =
  "id, at, request_id, tenant_id, actor_outside, actor_kind, actor_id, action, target_id, outcome, reason, ip";

/** Rows per insert at most: 12 parameters each, far under both databases' parameter limits. */
export const MAX_AUDIT_BATCH = 512;

/**
 * Rows per insert where the driver writes in the calling turn (better-sqlite3): a batch is
 * time during which no request is answered, so it is kept to a fraction of a millisecond.
 * Not fewer: each statement also pays a fixed part (its commit writes a page per index to the
 * WAL), which fewer rows would spread over fewer calls (bench/results/2026-12-05-verify-p99.md).
 */
export const SYNC_AUDIT_BATCH = 16;

/** The insert of `n` rows. `on conflict do nothing`: a retry after a commit whose answer was lost adds nothing. */
function insertSql(n: number): string {
  const row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
  return `insert into audit_events (${COLUMNS}) values ${Array.from({ length: n }, () => row).join(", ")} on conflict (id) do nothing`;
}

/** Equality filters: the filter's field and its column. */
const EQUALS: readonly (readonly [keyof AuditEventFilter, string])[] = [
  ["tenantId", "tenant_id"],
  ["actorId", "actor_id"],
  ["action", "action"],
  ["outcome", "outcome"],
  ["targetId", "target_id"],
  ["requestId", "request_id"],
];

interface AuditRow {
  id: string;
  at: unknown;
  request_id: string;
  tenant_id: string | null;
  /** 0 or 1. */
  actor_outside: number;
  actor_kind: string;
  actor_id: string | null;
  action: string;
  target_id: string | null;
  outcome: string;
  reason: string | null;
  ip: string | null;
}

/** The audit log's table: batched inserts, retention deletes, and filtered keyset reads. */
export class AuditEventRepository {
  /** Rows per insert the audit log should keep to: fewer where the driver blocks the event loop. */
  readonly batchRows: number;

  constructor(private readonly sql: Pick<SqlRunner, "run" | "all" | "blocking">) {
    this.batchRows = sql.blocking ? SYNC_AUDIT_BATCH : MAX_AUDIT_BATCH;
  }

  /**
   * Insert events in one statement ({@link MAX_AUDIT_BATCH} at most). Callers keep to a few
   * batch sizes (powers of two): each size is one statement, prepared once (SQLite).
   */
  async insert(events: readonly AuditEventRow[]): Promise<void> {
    const params: unknown[] = [];
    for (const e of events)
      params.push(
        e.id,
        e.at,
        e.requestId,
        e.tenantId,
        e.actorOutside ? 1 : 0,
        e.actorKind,
        e.actorId,
        e.action,
        e.targetId,
        e.outcome,
        e.reason,
        e.ip,
      );
    await this.sql.run(insertSql(events.length), params);
  }

  /**
   * Delete at most `batch` events older than `cutoff`; returns how many. In batches: one
   * statement deleting a year of events would hold the write lock (SQLite) or a long
   * transaction (PostgreSQL) for seconds.
   */
  async deleteBefore(cutoff: Date, batch: number): Promise<number> {
    return this.sql.run(
      `delete from audit_events where id in (select id from audit_events where at < ? limit ${Math.trunc(batch)})`,
      [cutoff],
    );
  }

  /** At most `limit` events matching `filter`, newest first (ties broken by id, descending). */
  async list(filter: AuditEventFilter, limit: number): Promise<StoredAuditEvent[]> {
    const where: string[] = [];
    const params: unknown[] = [];
    for (const [field, column] of EQUALS) {
      const value = filter[field];
      if (typeof value === "string") {
        where.push(`${column} = ?`);
        params.push(value);
      }
    }
    if (typeof filter.actorOutside === "boolean") {
      where.push("actor_outside = ?");
      params.push(filter.actorOutside ? 1 : 0);
    }
    if (filter.start) {
      where.push("at >= ?");
      params.push(filter.start);
    }
    if (filter.end) {
      where.push("at < ?");
      params.push(filter.end);
    }
    if (filter.after) {
      const at = new Date(filter.after.at);
      where.push("(at < ? or (at = ? and id < ?))");
      params.push(at, at, filter.after.id);
    }
    const rows = await this.sql.all<AuditRow>(
      `select ${COLUMNS} from audit_events${where.length > 0 ? ` where ${where.join(" and ")}` : ""} ` +
        "order by at desc, id desc limit ?",
      [...params, limit],
    );
    return rows.map((r) => ({
      id: r.id,
      at: toMillis(r.at) ?? 0,
      requestId: r.request_id,
      tenantId: r.tenant_id,
      actorOutside: Number(r.actor_outside) === 1,
      actorKind: r.actor_kind,
      actorId: r.actor_id,
      action: r.action,
      targetId: r.target_id,
      outcome: r.outcome,
      reason: r.reason,
      ip: r.ip,
    }));
  }
}
