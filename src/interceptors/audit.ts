import type { DescMethod } from "@bufbuild/protobuf";
import type { Interceptor } from "@connectrpc/connect";
import { Code, ConnectError } from "@connectrpc/connect";
import type { AuditLog } from "../audit.js";
import { requestState } from "../context.js";
import { TesseraError } from "../errors.js";
import { driverErrorAsTesseraError } from "../storage/errors.js";

/** Reads are not audited; everything that changes state or logs in is, whether it succeeds or is refused. */
const READ_ONLY = /^(Get|List|Check)/;
/** What a target id may look like in a record (ids are UUIDs; audit_events.target_id holds 64). */
const AUDITABLE_ID = /^[\w.:@-]{1,64}$/;

/** Whether calls of `method` are written to the audit log (refused ones included). */
export function isAudited(method: DescMethod): boolean {
  return !READ_ONLY.test(method.name);
}

/**
 * Audit interceptor: records every state-changing call, successful or refused, with
 * actor, action, target id and outcome. Request bodies are never recorded (they hold
 * passwords and tokens); the target is the request's `id` field when it has one.
 */
export function createAuditInterceptor(deps: { audit: AuditLog }): Interceptor {
  return (next) => (req) => {
    // Reads are not written, refused or not (a flood of bad credentials must not become a
    // flood of writes): they pass straight on, without an async frame of their own.
    if (!isAudited(req.method)) return next(req);
    return audited(next, req);
  };

  async function audited(next: Parameters<Interceptor>[0], req: Parameters<Parameters<Interceptor>[0]>[0]) {
    try {
      const res = await next(req);
      write(req, "success", null);
      return res;
    } catch (err) {
      // A database error is recorded as what it is answered as (UNAVAILABLE, ALREADY_EXISTS…).
      const e = driverErrorAsTesseraError(err) ?? err;
      const reason =
        e instanceof TesseraError ? e.reason : e instanceof ConnectError ? Code[e.code] : "INTERNAL";
      write(req, "failure", reason);
      throw err;
    }
  }

  function write(
    req: Parameters<Parameters<Interceptor>[0]>[0],
    outcome: "success" | "failure",
    reason: string | null,
  ) {
    const state = requestState(req.contextValues);
    const p = state.principal;
    const message = req.stream ? undefined : (req.message as Record<string, unknown>);
    const id = message?.id;
    // Only an id that can name something: a refused request's `id` is the caller's text (a
    // NUL, 4 KiB), which the audit table's column would refuse, losing the record.
    const target = typeof id === "string" && AUDITABLE_ID.test(id) ? id : null;
    deps.audit.record({
      requestId: state.requestId,
      tenantId: p?.tenantId ?? null,
      actorKind: p?.kind ?? "anonymous",
      actorId: p?.id ?? null,
      action: `${req.service.typeName}/${req.method.name}`,
      targetId: target,
      outcome,
      reason,
      ip: state.ip,
    });
  }
}
