import type { DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { AuditLog } from "../audit.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import { driverErrorAsTesseraError } from "../storage/errors.js";

/** What a target id may look like in a record (ids are UUIDs; audit_events.target_id holds 64). */
const AUDITABLE_ID = /^[\w.:@-]{1,64}$/;

/** The reason a call that failed with `err` is recorded with: a database error as what it is answered as (UNAVAILABLE, ALREADY_EXISTS…). */
export function auditReason(err: unknown): string {
  const e = driverErrorAsTesseraError(err) ?? err;
  return e instanceof TesseraError ? e.reason : e instanceof ConnectError ? Code[e.code] : "INTERNAL";
}

/**
 * Write one call of an audited method (its rule's `audit`) to the audit log: actor (the
 * principal, or anonymous), action, target id and outcome. Used by admission for the calls
 * it refuses and by the audit interceptor for the calls it admitted. Request bodies are
 * never recorded (they hold passwords and tokens); the target is the request's `id` field
 * when it has one (`message`: the request, undefined for a stream).
 */
export function auditCall(
  audit: AuditLog,
  state: RequestState,
  method: DescMethod,
  message: unknown,
  outcome: "success" | "failure",
  reason: string | null,
): void {
  const p = state.principal;
  const id = (message as Record<string, unknown> | undefined)?.id;
  // Only an id that can name something: a refused request's `id` is the caller's text (a
  // NUL, 4 KiB), which the audit table's column would refuse, losing the record.
  const target = typeof id === "string" && AUDITABLE_ID.test(id) ? id : null;
  audit.record({
    requestId: state.requestId,
    tenantId: p?.tenantId ?? null,
    actorKind: p?.kind ?? "anonymous",
    actorId: p?.id ?? null,
    action: `${method.parent.typeName}/${method.name}`,
    targetId: target,
    outcome,
    reason,
    ip: state.ip,
  });
}
