import { auditFiling } from "../admission/audit.js";
import type { AuditLog } from "../audit.js";
import type { AccessTokenClaims, JwtService } from "../auth/jwt.js";
import type { Principal } from "../auth/principal.js";
import { longestPrefix, parseToken } from "../auth/token-format.js";
import type { Clock } from "../clock.js";
import { raiseRevocationCutoff, revokeMachineAccessTokens } from "../services/machine-user/access-token.js";
import { revokeMadeWith } from "../services/token/maker.js";
import { hashRefreshToken, REFRESH_TOKEN_PREFIX, type SessionIssuer } from "../services/user/sessions.js";
import { RefreshToken } from "../storage/entities.js";
import type { Storage } from "../storage/orm.js";
import { ApiToken } from "../storage/token-entities.js";
import { type ClientAuthDeps, type OAuthRequest, tokenRequest } from "./form.js";
import { asOAuthError, OAuthError } from "./oauth-error.js";
import { oauthAuditReason } from "./token.js";

/** What the revocation endpoint needs. */
export interface RevocationEndpointDeps extends ClientAuthDeps {
  storage: Storage;
  jwt: JwtService;
  sessions: SessionIssuer;
  audit: AuditLog;
  clock: Clock;
  /** auth.jwt.clockSkew */
  clockSkewSeconds: number;
  prefixes: { pat: string; apiKey: string; machine: string };
}

/** The audit action of a revocation through the endpoint. */
export const REVOKE_ACTION = "oauth2/revoke";

/**
 * `POST /oauth2/revoke` (RFC 7009): the authenticated caller (client authentication, or
 * any bearer credential) revokes one of its own credentials, committed before the answer
 * and refused on every instance from the next request:
 * - a refresh token, or a user access token (its `sid`): the session ends, as Logout ends it;
 * - a personal access token or API key of the caller: revoked, as Revoke… revokes it;
 * - a machine access token of the caller: every access token the machine user was issued
 *   so far ends (RFC 7009 §2: a revocation may take the other tokens of the same grant;
 *   Tessera keeps no per-token list of machine tokens), its credentials stay.
 * Anything else (unknown, expired, malformed, another principal's, another tenant's) is
 * answered 200 exactly the same, with nothing revoked (§2.2: invalid tokens cause no error;
 * and tenants are walls). A machine user's own long-lived credential (`tsr_mu_…`) is not an
 * OAuth token: `unsupported_token_type` (rotate it with RotateMachineUserCredentials).
 * `token_type_hint` is accepted and needs no trust: every kind is told apart by its shape.
 * @throws OAuthError
 */
export async function revocationEndpoint(deps: RevocationEndpointDeps, req: OAuthRequest): Promise<void> {
  // What the revocation revoked, once its first write committed: a step that fails after an
  // earlier one committed (a token revoked, the tokens made with it not) is audited with its
  // target; one whose only write failed, without one.
  const found: Found = { target: null };
  try {
    await revokeAndRecord(deps, req, found);
  } catch (err) {
    // Recorded as Logout and the Revoke… RPCs record their failures: a caller trying tokens
    // here with a secret that does not verify leaves its trace (the per-IP limit bounds it).
    const principal = req.state.principal;
    deps.audit.record({
      requestId: req.state.requestId,
      ...auditFiling(principal, principal?.tenantId ?? null),
      actorKind: principal?.kind ?? "anonymous",
      actorId: principal?.id ?? null,
      action: REVOKE_ACTION,
      targetId: found.target,
      outcome: "failure",
      reason: oauthAuditReason(err),
      ip: req.state.ip,
    });
    throw err;
  }
}

/** The target of a revocation, set once its first write committed. */
interface Found {
  target: string | null;
}

/** Revoke the caller's token, and record the revocation (see {@link revocationEndpoint}). */
async function revokeAndRecord(deps: RevocationEndpointDeps, req: OAuthRequest, found: Found): Promise<void> {
  const { principal, token } = await tokenRequest(deps, req);
  if (opaquePrefix(deps.prefixes, token) === deps.prefixes.machine)
    throw new OAuthError(
      "unsupported_token_type",
      "a machine user's credential is not revoked here; rotate it with RotateMachineUserCredentials",
    );
  let target: string | null;
  try {
    target = await revokeOwn(deps, principal, token, found);
  } catch (err) {
    throw asOAuthError(err, "grant");
  }
  deps.audit.record({
    requestId: req.state.requestId,
    // The caller's own credential: in the caller's tenant.
    ...auditFiling(principal, principal.tenantId),
    actorKind: principal.kind,
    actorId: principal.id,
    action: REVOKE_ACTION,
    // What was revoked (a session, a token id, the machine user), or nothing.
    targetId: target,
    outcome: "success",
    reason: target === null ? "NOTHING_REVOKED" : null,
    ip: req.state.ip,
  });
}

/**
 * The configured prefix `token` is of: the longest it starts with (of nested ones the
 * shorter would take the longer's tokens for malformed ones of its own, and revoke nothing).
 */
function opaquePrefix(prefixes: RevocationEndpointDeps["prefixes"], token: string): string | undefined {
  return longestPrefix(token, [prefixes.machine, prefixes.pat, prefixes.apiKey]);
}

/** Revoke `token` when it is the caller's; returns the id of what was revoked, or null. */
async function revokeOwn(
  deps: RevocationEndpointDeps,
  caller: Principal,
  token: string,
  found: Found,
): Promise<string | null> {
  const em = deps.storage.em.fork();
  /** `id`, noted in `found` once its first write committed (each write commits on its own). */
  const committed = (id: string) => () => {
    found.target = id;
  };
  if (token.startsWith(REFRESH_TOKEN_PREFIX)) {
    if (caller.kind !== "user") return null;
    const row = await em.findOne(RefreshToken, { tokenHash: hashRefreshToken(token) });
    if (!row || row.userId !== caller.id) return null;
    await deps.sessions.revokeFamily(em, row.familyId, committed(row.familyId));
    return row.familyId;
  }
  const prefix = opaquePrefix(deps.prefixes, token);
  if (prefix !== undefined) {
    const parsed = parseToken(token, [prefix]);
    if (parsed === null || parsed === "malformed" || caller.kind !== "user") return null;
    const row = await em.findOne(ApiToken, { publicId: parsed.id });
    if (!row || row.ownerUserId !== caller.id) return null;
    const at = new Date(deps.clock());
    await em.nativeUpdate(ApiToken, { id: row.id, revokedAt: null }, { revokedAt: at });
    committed(row.id)();
    await revokeMadeWith(em, row.id, at);
    return row.id;
  }
  let claims: AccessTokenClaims;
  try {
    claims = await deps.jwt.verify(token);
  } catch {
    // Not ours, forged, or expired already: nothing to revoke.
    return null;
  }
  if (claims.sub !== caller.id || claims.tid !== caller.tenantId) return null;
  if (claims.pk === "user" && caller.kind === "user") {
    if (!claims.sid) return null;
    await deps.sessions.revokeFamily(em, claims.sid, committed(claims.sid));
    return claims.sid;
  }
  if (claims.pk === "machine" && caller.kind === "machine") {
    const cutoff = deps.clock();
    if (!(await revokeMachineAccessTokens(em, caller.id, cutoff, deps.clockSkewSeconds))) return null;
    committed(caller.id)();
    // A token signed while the write was on its way may bear a later second than the cut-off.
    await raiseRevocationCutoff(em, caller.id, cutoff, deps.clock(), deps.clockSkewSeconds);
    return caller.id;
  }
  return null;
}
