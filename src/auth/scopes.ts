/**
 * Scope matching shared by the server's admission (src/admission/) and the SDK's
 * `hasPermission` (one implementation, so client and server never disagree).
 *
 * A granted scope matches a required one when it is equal, when it is `ns:*` and the
 * required scope is in namespace `ns`, or when it is `*`.
 */

/** The scopes the seeds define; any `ns:action` string is accepted as well. */
export const KNOWN_SCOPES = [
  "cluster:read",
  "cluster:write",
  "swarm:deploy",
  "swarm:stop",
  "module:upload",
  "results:read",
  "admin:*",
  "admin:users",
  "admin:tokens",
  "admin:tenants",
  "admin:machine-users",
  "*",
] as const;

const SCOPE_RE = /^(\*|[a-z][a-z0-9-]*:(\*|[a-z][a-z0-9-]*))$/;

/** Whether `scope` is syntactically valid (`*`, `ns:*` or `ns:action`). */
export function isValidScope(scope: string): boolean {
  return SCOPE_RE.test(scope);
}

/** Whether one granted scope covers one required scope. */
export function scopeCovers(granted: string, required: string): boolean {
  if (granted === "*" || granted === required) return true;
  if (granted.endsWith(":*")) {
    const ns = granted.slice(0, -1); // keep the colon: "admin:" must not match "administrator:x"
    return required.startsWith(ns) && required !== granted.slice(0, -2);
  }
  return false;
}

/** Whether the granted set covers `required`. */
export function hasScope(granted: readonly string[], required: string): boolean {
  for (const g of granted) if (scopeCovers(g, required)) return true;
  return false;
}

/** Whether the granted set covers every scope in `required`. */
export function hasAllScopes(granted: readonly string[], required: readonly string[]): boolean {
  for (const r of required) if (!hasScope(granted, r)) return false;
  return true;
}

/**
 * The part of `requested` that `granted` covers: what a derived credential (a token of
 * a user, a JWT whose owner lost a scope) may still use.
 */
export function intersectScopes(requested: readonly string[], granted: readonly string[]): string[] {
  return requested.filter((r) => hasScope(granted, r));
}

/** Parse a space-separated scope string as stored in the database and in the JWT `scope` claim. */
export function parseScopeString(value: string | null | undefined): string[] {
  if (!value) return [];
  return value.split(" ").filter((s) => s.length > 0);
}

/** Normalise (dedupe, sort) for storage. */
export function formatScopes(scopes: readonly string[]): string {
  return [...new Set(scopes)].sort().join(" ");
}
