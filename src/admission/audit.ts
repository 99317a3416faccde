import type { DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { AuditLog } from "../audit.js";
import { isSuperuser, type Principal } from "../auth/principal.js";
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
 * Name what an audited call acts on, for its record: `id` where the request does not name
 * it (the `handler` rule of {@link AUDIT_TARGETS}: what the call created, the user a Login or
 * a refresh token resolved to), and always the tenant that object is in, or null for an act
 * on no single tenant (CreateTenant). The tenant is required so that no handler can name an
 * object without it: it decides who reads the record (see {@link auditFiling}). Handlers
 * that load an object by id name its tenant through `reachesTenant` (services/common.ts).
 */
export function auditTarget(state: RequestState, target: { id?: string; tenantId: string | null }): void {
  const audited = state.audited;
  if (audited === undefined)
    state.audited =
      target.id === undefined
        ? { tenantId: target.tenantId }
        : { targetId: target.id, tenantId: target.tenantId };
  else {
    if (target.id !== undefined) audited.targetId = target.id;
    audited.tenantId = target.tenantId;
  }
}

/** Where a record is filed: {@link auditFiling}'s answer. */
export interface AuditFiling {
  tenantId: string | null;
  actorOutside: boolean;
}

/**
 * The one rule of where an audit record is filed, so read by that tenant's `admin:audit`
 * holders. A principal without `*` acts only in its own tenant: there. A `*` principal (the
 * bootstrap admin, of the default tenant; the static admin token, of none) acts on any
 * tenant's objects: in the tenant of the object acted on (`targetTenant`), so that its
 * auditors see what the platform did to them, and never in the actor's own, whose auditors
 * would read other tenants' object ids; none (`*` readers only) when the act is on no single
 * tenant. No principal: the tenant of the object named (a failed Login of a user that
 * exists). `actorOutside`: the actor is not of the tenant filed under, so that tenant's
 * readers see it as the platform, never by its id (services/audit/audit-service.ts).
 */
export function auditFiling(actor: Principal | null | undefined, targetTenant: string | null): AuditFiling {
  if (actor === null || actor === undefined) return { tenantId: targetTenant, actorOutside: false };
  if (!isSuperuser(actor)) return { tenantId: actor.tenantId, actorOutside: false };
  return { tenantId: targetTenant, actorOutside: targetTenant !== null && targetTenant !== actor.tenantId };
}

/** The target decision of `method`. */
function ruleOf(method: DescMethod): AuditTargetRule {
  return AUDIT_TARGETS[`${method.parent.typeName}/${method.name}`] ?? "id";
}

/** The target of a record, as {@link AUDIT_TARGETS} decides it for `method`. */
function targetOf(state: RequestState, rule: AuditTargetRule, message: unknown): string | null {
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
  const rule = ruleOf(method);
  const target = targetOf(state, rule, message);
  // A call on the caller itself is in the caller's tenant; else where the handler said it acted.
  const filing = auditFiling(p, rule === "actor" ? (p?.tenantId ?? null) : (state.audited?.tenantId ?? null));
  audit.record({
    requestId: state.requestId,
    tenantId: filing.tenantId,
    actorOutside: filing.actorOutside,
    actorKind: p?.kind ?? "anonymous",
    actorId: p?.id ?? null,
    action: `${method.parent.typeName}/${method.name}`,
    targetId: target,
    outcome,
    reason,
    ip: state.ip,
  });
}
