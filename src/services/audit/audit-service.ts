import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import type { AuditEventSchema, AuditService } from "../../../gen/tessera/v1/audit_service_pb.js";
import { errors } from "../../errors.js";
import type {
  AuditEventFilter,
  AuditEventRepository,
  StoredAuditEvent,
} from "../../storage/repositories/audit.js";
import { principalOf, requestTime, tenantScope } from "../common.js";
import { epochMsKey, keysetPage, keysetToken, pageLimit, uuidKey } from "../pagination.js";

/** Dependencies of the AuditService implementation. */
export interface AuditServiceDeps {
  events: Pick<AuditEventRepository, "list">;
}

/** The page token: the last event's time and id (keyset: newest first, ties broken by id). */
const pageToken = keysetToken(epochMsKey, uuidKey);

/** A filter string: at most `max` characters (the column's width), else nothing could match. */
function filterValue(value: string, field: string, max: number): string | null {
  if (!value) return null;
  if (value.length > max) throw errors.invalidArgument(`${field} is at most ${max} characters`, field);
  return value;
}

/**
 * How an actor from outside the reader's tenant is shown to it ({@link toProto}): kind kept,
 * this id in place of its own, and no address. A fixed word, not an id: the default tenant's
 * superuser or the static admin token is the platform operator, whose identity is not the
 * tenant's to read (the tenant wall); `actor_id` = this finds those events.
 */
export const PLATFORM_ACTOR_ID = "platform";

/**
 * An event as `reader`'s tenant sees it (`walled`: the reader lacks `*`): an actor of
 * another tenant (a `*` principal that acted on this tenant's object) as the platform, never
 * by its id or address.
 */
function toProto(event: StoredAuditEvent, walled: boolean): MessageInitShape<typeof AuditEventSchema> {
  const hidden = walled && event.actorOutside;
  return {
    id: event.id,
    time: timestampFromMs(event.at),
    requestId: event.requestId,
    tenantId: event.tenantId ?? "",
    actorKind: event.actorKind,
    actorId: hidden ? PLATFORM_ACTOR_ID : (event.actorId ?? ""),
    action: event.action,
    targetId: event.targetId ?? "",
    outcome: event.outcome,
    reason: event.reason ?? "",
    ip: hidden ? "" : (event.ip ?? ""),
  };
}

/**
 * AuditService: the audit log, read through its repository (one indexed query per page;
 * the rows are plain records, no entity needs loading). Tenant-scoped like every list: a
 * caller without `*` is confined to its own tenant, and naming another tenant is an empty
 * list, exactly like a tenant without events. Within a tenant, what a `*` principal of
 * another tenant did there is shown with the actor as the platform ({@link PLATFORM_ACTOR_ID}).
 */
export function createAuditService(deps: AuditServiceDeps): ServiceImpl<typeof AuditService> {
  return {
    async listAuditEvents(req, ctx) {
      const limit = pageLimit(req.pageSize);
      const filter: AuditEventFilter = {};
      const scope = tenantScope(principalOf(ctx));
      const tenant = filterValue(req.tenantId, "tenant_id", 36);
      if (scope !== null) {
        // The wall: another tenant's events are not there for this caller.
        if (tenant !== null && tenant !== scope) return { events: [], nextPageToken: "" };
        filter.tenantId = scope;
      } else filter.tenantId = tenant;
      filter.actorId = filterValue(req.actorId, "actor_id", 64);
      if (scope !== null && filter.actorId !== null) {
        // As the events are shown: the platform's under its word, and no outside actor by its
        // own id (else naming the operator's id would tell whether it acted here).
        filter.actorOutside = filter.actorId === PLATFORM_ACTOR_ID;
        if (filter.actorOutside) filter.actorId = null;
      }
      filter.action = filterValue(req.action, "action", 128);
      if (req.outcome) {
        if (req.outcome !== "success" && req.outcome !== "failure")
          throw errors.invalidArgument('outcome must be "success" or "failure"', "outcome");
        filter.outcome = req.outcome;
      }
      filter.targetId = filterValue(req.targetId, "target_id", 64);
      filter.requestId = filterValue(req.requestId, "request_id", 64);
      filter.start = req.startTime ? requestTime(req.startTime, "start_time") : null;
      filter.end = req.endTime ? requestTime(req.endTime, "end_time") : null;
      if (filter.start && filter.end && filter.end.getTime() < filter.start.getTime())
        throw errors.invalidArgument("end_time is before start_time", "end_time");
      if (req.pageToken) {
        const [at, id] = pageToken.decode(req.pageToken);
        filter.after = { at, id };
      }

      const rows = await deps.events.list(filter, limit + 1);
      const page = keysetPage(rows, limit, pageToken, (event) => [event.at, event.id]);
      return {
        events: page.items.map((event) => toProto(event, scope !== null)),
        nextPageToken: page.nextPageToken,
      };
    },
  };
}
