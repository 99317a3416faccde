import { errors, TesseraError } from "../errors.js";
import type { Principal } from "./principal.js";
import { hasAllScopes, isValidScope } from "./scopes.js";

/** A principal that is being managed: what it holds now (none for one being created). */
export interface ManagedTarget {
  scopes: readonly string[];
}

/** The target of a create: it holds nothing yet, so only the resulting scopes count. */
export const NEW_PRINCIPAL: ManagedTarget = Object.freeze({ scopes: Object.freeze([]) });

/**
 * The one rule for who may manage whom: a caller may create, change, delete, re-credential
 * or act on a principal (a user, a machine user, their credentials, bindings, backends
 * and tokens) only when the caller's own effective scopes cover every scope the target
 * holds now AND every scope it would hold afterwards (`resulting`). Otherwise a holder of
 * `admin:users` could reset the password of a `*` admin and sign in as it.
 *
 * Wildcards follow `hasAllScopes`: `admin:*` covers `admin:users`; only `*` covers `*`, so
 * a target holding `*` is managed only by a caller holding `*`.
 *
 * Resulting scopes are checked for syntax first (InvalidArgument); a refusal is
 * PermissionDenied with reason ACCESS_DENIED. Tenant visibility is decided before this
 * (another tenant's principal is NotFound, never ACCESS_DENIED).
 */
export function assertMayManage(
  caller: Pick<Principal, "scopes">,
  target: ManagedTarget,
  resulting: readonly string[] = [],
): void {
  for (const s of resulting)
    if (!isValidScope(s)) throw errors.invalidArgument(`invalid scope "${s}"`, "scopes");
  if (!hasAllScopes(caller.scopes, resulting)) {
    throw new TesseraError("ACCESS_DENIED", "cannot grant scopes the caller does not hold");
  }
  if (!mayManage(caller, target)) {
    throw new TesseraError(
      "ACCESS_DENIED",
      "cannot manage a principal holding scopes the caller does not hold",
    );
  }
}

/**
 * The target half of {@link assertMayManage} as a predicate, for reads that must hide what
 * the caller may not manage (another user's token metadata: such tokens read as missing,
 * not as ACCESS_DENIED, so their existence is not told either).
 */
export function mayManage(caller: Pick<Principal, "scopes">, target: ManagedTarget): boolean {
  return hasAllScopes(caller.scopes, target.scopes);
}
