import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import type { AuditEventSchema, AuditService } from "../../../gen/tessera/v1/audit_service_pb.js";
import { errors } from "../../errors.js";
import { type SqlRunner, toMillis } from "../../storage/sql.js";
import { principalOf, tenantScope } from "../common.js";

/** Dependencies of the AuditService implementation. */
export interface AuditServiceDeps {
  sql: SqlRunner;
}

interface AuditRow {
  id: string;
  at: unknown;
  request_id: string;
  tenant_id: string | null;
  actor_kind: string;
  actor_id: string | null;
  action: string;
  target_id: string | null;
  outcome: string;
  reason: string | null;
  ip: string | null;
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * The page token: the last event's time and id (keyset: newest first, ties broken by id),
 * base64url so clients treat it as opaque. Not signed: it only says where to resume, and
 * the tenant wall is applied to every page's query, whatever the token says.
 */
function encodeToken(at: number, id: string): string {
  return Buffer.from(`${at}.${id}`, "utf8").toString("base64url");
}

function decodeToken(token: string): { at: number; id: string } {
  const m = /^(\d{1,16})\.([0-9a-f-]{36})$/.exec(Buffer.from(token, "base64url").toString("utf8"));
  if (!m || !UUID_RE.test(m[2]!)) throw errors.invalidArgument("page_token is not valid", "page_token");
  return { at: Number(m[1]), id: m[2]! };
}

/** A filter string: at most `max` characters (the column's width), else nothing could match. */
function filterValue(value: string, field: string, max: number): string | null {
  if (!value) return null;
  if (value.length > max) throw errors.invalidArgument(`${field} is at most ${max} characters`, field);
  return value;
}

function toProto(row: AuditRow): MessageInitShape<typeof AuditEventSchema> {
  return {
    id: row.id,
    time: timestampFromMs(toMillis(row.at) ?? 0),
    requestId: row.request_id,
    tenantId: row.tenant_id ?? "",
    actorKind: row.actor_kind,
    actorId: row.actor_id ?? "",
    action: row.action,
    targetId: row.target_id ?? "",
    outcome: row.outcome,
    reason: row.reason ?? "",
    ip: row.ip ?? "",
  };
}

/**
 * AuditService: the audit log, read through raw SQL (one indexed query per page; the
 * rows are plain records, no entity needs loading). Tenant-scoped like every list: a
 * caller without `*` is confined to its own tenant, and naming another tenant is an empty
 * list, exactly like a tenant without events.
 */
export function createAuditService(deps: AuditServiceDeps): ServiceImpl<typeof AuditService> {
  return {
    async listAuditEvents(req, ctx) {
      if (req.pageSize < 0) throw errors.invalidArgument("page_size must not be negative", "page_size");
      const limit = req.pageSize === 0 ? 50 : Math.min(req.pageSize, 200);
      const where: string[] = [];
      const params: unknown[] = [];
      const add = (clause: string, ...values: unknown[]) => {
        where.push(clause);
        params.push(...values);
      };

      const scope = tenantScope(principalOf(ctx));
      const tenant = filterValue(req.tenantId, "tenant_id", 36);
      if (scope !== null) {
        // The wall: another tenant's events are not there for this caller.
        if (tenant !== null && tenant !== scope) return { events: [], nextPageToken: "" };
        add("tenant_id = ?", scope);
      } else if (tenant !== null) add("tenant_id = ?", tenant);

      const actor = filterValue(req.actorId, "actor_id", 64);
      if (actor !== null) add("actor_id = ?", actor);
      const action = filterValue(req.action, "action", 128);
      if (action !== null) add("action = ?", action);
      if (req.outcome) {
        if (req.outcome !== "success" && req.outcome !== "failure")
          throw errors.invalidArgument('outcome must be "success" or "failure"', "outcome");
        add("outcome = ?", req.outcome);
      }
      const target = filterValue(req.targetId, "target_id", 64);
      if (target !== null) add("target_id = ?", target);
      const requestId = filterValue(req.requestId, "request_id", 64);
      if (requestId !== null) add("request_id = ?", requestId);
      const start = req.startTime ? timestampDate(req.startTime) : null;
      const end = req.endTime ? timestampDate(req.endTime) : null;
      if (start && end && end.getTime() < start.getTime())
        throw errors.invalidArgument("end_time is before start_time", "end_time");
      if (start) add("at >= ?", start);
      if (end) add("at < ?", end);
      if (req.pageToken) {
        const after = decodeToken(req.pageToken);
        const at = new Date(after.at);
        add("(at < ? or (at = ? and id < ?))", at, at, after.id);
      }

      const rows = await deps.sql.all<AuditRow>(
        "select id, at, request_id, tenant_id, actor_kind, actor_id, action, target_id, outcome, reason, ip " +
          `from audit_events${where.length > 0 ? ` where ${where.join(" and ")}` : ""} ` +
          "order by at desc, id desc limit ?",
        [...params, limit + 1],
      );
      const page = rows.slice(0, limit);
      const last = page[page.length - 1];
      return {
        events: page.map(toProto),
        nextPageToken: rows.length > limit && last ? encodeToken(toMillis(last.at) ?? 0, last.id) : "",
      };
    },
  };
}
