import type { DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { AuditLog } from "../audit.js";
import { isSuperuser } from "../auth/principal.js";
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
 * Where the target of an audited call's record comes from, decided for every audited RPC
 * (test/audit-service.test.ts checks that each one has a decision and that its records
 * carry it), so that `ListAuditEvents(target_id)` answers "what happened to X":
 * - a request field naming the object acted on (`id`, `machineUserId`);
 * - `handler`: the handler names it with {@link auditTarget} once known (the id of what
 *   it created; the user a Login or a refresh token resolved to), none when it failed first;
 * - `actor`: the caller acts on itself (ChangePassword, IssueAccessToken);
 * - `none`: nothing is named.
 */
export type AuditTargetRule = "id" | "machineUserId" | "handler" | "actor" | "none";

/** The target decision of each audited RPC, by `<service type name>/<method>`. */
export const AUDIT_TARGETS: Readonly<Record<string, AuditTargetRule>> = {
  "tessera.v1.UserService/Login": "handler",
  "tessera.v1.UserService/RefreshToken": "handler",
  "tessera.v1.UserService/Logout": "handler",
  "tessera.v1.UserService/ChangePassword": "actor",
  "tessera.v1.UserService/CreateUser": "handler",
  "tessera.v1.UserService/UpdateUser": "id",
  "tessera.v1.UserService/DeleteUser": "id",
  "tessera.v1.TenantService/CreateTenant": "handler",
  "tessera.v1.TenantService/UpdateTenant": "id",
  "tessera.v1.TenantService/CreateApplication": "handler",
  "tessera.v1.TenantService/DeleteApplication": "id",
  "tessera.v1.TokenService/CreatePersonalAccessToken": "handler",
  "tessera.v1.TokenService/RevokePersonalAccessToken": "id",
  "tessera.v1.TokenService/CreateApiKey": "handler",
  "tessera.v1.TokenService/RevokeApiKey": "id",
  "tessera.v1.MachineUserService/CreateMachineUser": "handler",
  "tessera.v1.MachineUserService/UpdateMachineUser": "id",
  "tessera.v1.MachineUserService/DeleteMachineUser": "id",
  "tessera.v1.MachineUserService/RotateMachineUserCredentials": "id",
  "tessera.v1.MachineUserService/BindCertificate": "machineUserId",
  "tessera.v1.MachineUserService/UnbindCertificate": "machineUserId",
  "tessera.v1.MachineUserService/RegisterBackend": "handler",
  "tessera.v1.MachineUserService/IssueAccessToken": "actor",
  "tessera.v1.MachineUserService/DeregisterBackend": "id",
};

/**
 * Name what an audited call acted on, for its record (the `handler` rule of
 * {@link AUDIT_TARGETS}). `tenantId`: the record's tenant when the call has no principal
 * to give it one (a failed Login of a user that exists, so that its tenant's admins see
 * guessing against their users).
 */
export function auditTarget(state: RequestState, targetId: string, tenantId?: string): void {
  state.audited = tenantId === undefined ? { targetId } : { targetId, tenantId };
}

/** The target of a record, as {@link AUDIT_TARGETS} decides it for `method`. */
function targetOf(state: RequestState, method: DescMethod, message: unknown): string | null {
  const rule = AUDIT_TARGETS[`${method.parent.typeName}/${method.name}`] ?? "id";
  let id: unknown;
  if (rule === "id" || rule === "machineUserId")
    id = (message as Record<string, unknown> | undefined)?.[rule];
  else if (rule === "handler") id = state.audited?.targetId;
  else if (rule === "actor") id = state.principal?.id;
  // Only an id that can name something: a refused request's `id` is the caller's text (a
  // NUL, 4 KiB), which the audit table's column would refuse, losing the record.
  return typeof id === "string" && AUDITABLE_ID.test(id) ? id : null;
}

/**
 * Write one call of an audited method (its rule's `audit`) to the audit log: actor (the
 * principal, or anonymous), action, target id and outcome. Used by admission for the calls
 * it refuses and by the audit interceptor for the calls it admitted. Request bodies are
 * never recorded (they hold passwords and tokens); the target is found as
 * {@link AUDIT_TARGETS} says (`message`: the request, undefined for a stream).
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
  const target = targetOf(state, method, message);
  audit.record({
    requestId: state.requestId,
    tenantId: recordTenant(state),
    actorKind: p?.kind ?? "anonymous",
    actorId: p?.id ?? null,
    action: `${method.parent.typeName}/${method.name}`,
    targetId: target,
    outcome,
    reason,
    ip: state.ip,
  });
}

/**
 * The tenant a record is stored in, so read by that tenant's `admin:audit` holders: the
 * actor's. Not a cross-tenant principal's (`*`): what it does may name any tenant's objects,
 * which its own tenant's admins must not see (the tenant wall), so its records are the
 * platform's, with no tenant, read by `*` holders only, as the static admin token's are.
 * No principal: the tenant a handler named (a failed Login of a user that exists), else none.
 */
function recordTenant(state: RequestState): string | null {
  const p = state.principal;
  if (p === null || p === undefined) return state.audited?.tenantId ?? null;
  return isSuperuser(p) ? null : p.tenantId;
}
