import { auditFiling } from "../admission/audit.js";
import type { AuditLog } from "../audit.js";
import type { AccessTokenClaims, JwtService } from "../auth/jwt.js";
import type { Principal } from "../auth/principal.js";
import { longestPrefix, parseToken } from "../auth/token-format.js";
import type { Clock } from "../clock.js";
import { raiseRevocationCutoff, revokeMachineAccessTokens } from "../services/machine-user/access-token.js";
import { revokeMadeWith } from "../services/token/maker.js";
import {
  hashRefreshToken,
  isRefreshTokenShaped,
  REFRESH_TOKEN_PREFIX,
  type SessionIssuer,
} from "../services/user/sessions.js";
import { RefreshToken, User } from "../storage/entities.js";
import type { Storage } from "../storage/orm.js";
import { ApiToken } from "../storage/token-entities.js";
import { type ClientAuthDeps, type OAuthRequest, presentsClientSecret, tokenRequest } from "./form.js";
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
 * and refused on every instance from the next request (and a public client, none, its
 * refresh token: {@link revokeWithRefreshToken}):
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
    record(deps, req, found, "failure", oauthAuditReason(err));
    throw err;
  }
}

/** What a revocation found, as its writes committed. */
interface Found {
  /** The target of a revocation, set once its first write committed. */
  target: string | null;
  /** A public client's revocation: the user whose session its refresh token is, once found. */
  user?: { id: string; tenantId: string | null };
}

/**
 * The audit record of a revocation: by the caller, in the caller's tenant (its own
 * credential); a public client's, anonymous, in the tenant of the user whose session its
 * token is, once found.
 * The target is what was revoked (a session, a token id, the machine user), or nothing.
 */
function record(
  deps: RevocationEndpointDeps,
  req: OAuthRequest,
  found: Found,
  outcome: "success" | "failure",
  reason: string | null,
): void {
  const { user, target } = found;
  const principal = req.state.principal;
  deps.audit.record({
    requestId: req.state.requestId,
    ...(user !== undefined
      ? { tenantId: user.tenantId, actorOutside: false }
      : auditFiling(principal, principal?.tenantId ?? null)),
    // A public client's: by nobody who authenticated (whoever held the token, perhaps a
    // thief), as Logout records it; filed in the session's tenant, naming the session.
    actorKind: user !== undefined ? "anonymous" : (principal?.kind ?? "anonymous"),
    actorId: user !== undefined ? null : (principal?.id ?? null),
    action: REVOKE_ACTION,
    targetId: target,
    outcome,
    reason: reason ?? (target === null ? "NOTHING_REVOKED" : null),
    ip: req.state.ip,
  });
}

/** Revoke the caller's token, and record the revocation (see {@link revocationEndpoint}). */
async function revokeAndRecord(deps: RevocationEndpointDeps, req: OAuthRequest, found: Found): Promise<void> {
  const presented = req.form.get("token");
  // RFC 7009 §2.1: a public client revokes with its token alone. Only a refresh token, and
  // only with no client credentials: one that does not verify is refused (below), never
  // read as none. A client certificate is no authority either way: ignored here, as by the
  // refresh_token grant.
  if (presented?.startsWith(REFRESH_TOKEN_PREFIX) && !presentsClientSecret(req))
    return revokeWithRefreshToken(deps, req, presented, found);
  const { principal, token } = await tokenRequest(deps, req);
  if (opaquePrefix(deps.prefixes, token) === deps.prefixes.machine)
    throw new OAuthError(
      "unsupported_token_type",
      "a machine user's credential is not revoked here; rotate it with RotateMachineUserCredentials",
    );
  try {
    found.target = await revokeOwn(deps, principal, token, found);
  } catch (err) {
    throw asOAuthError(err, "grant");
  }
  record(deps, req, found, "success", null);
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

/**
 * A public client's revocation of its refresh token (RFC 7009 §2.1: with no client
 * authentication). Holding the token is the authority to end its session, as for Logout
 * and the refresh_token grant: the session ends as Logout ends it (whichever tenant, and
 * whether the token is live, spent or expired), recorded as Logout's: by an anonymous caller.
 * An unknown token (or one of another shape) revokes nothing, answered 200 the same.
 *
 * Its cost, for anyone: the per-IP limit counted before the body was read (as for
 * Logout), one SHA-256 of a token of the issued shape (nothing else is hashed) and one
 * indexed read; no password hashing, no failure budget (nothing here is a guess that
 * could succeed: a refresh token is 256 random bits).
 */
async function revokeWithRefreshToken(
  deps: RevocationEndpointDeps,
  req: OAuthRequest,
  token: string,
  found: Found,
): Promise<void> {
  try {
    const em = deps.storage.em.fork();
    const row = isRefreshTokenShaped(token)
      ? await em.findOne(RefreshToken, { tokenHash: hashRefreshToken(token) })
      : null;
    if (row !== null) {
      const user = await em.findOne(User, { id: row.userId }, { fields: ["tenantId"] });
      found.user = { id: row.userId, tenantId: user?.tenantId ?? null };
      await deps.sessions.revokeFamily(em, row.familyId, () => {
        found.target = row.familyId;
      });
    }
  } catch (err) {
    throw asOAuthError(err, "grant");
  }
  record(deps, req, found, "success", null);
}
