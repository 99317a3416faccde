import type { DescMethod } from "@bufbuild/protobuf";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { auditCall, auditReason, auditTarget } from "../admission/audit.js";
import type { AuditLog } from "../audit.js";
import { assertMayManage, NEW_PRINCIPAL } from "../auth/authority.js";
import type { JwtService } from "../auth/jwt.js";
import { formatScopes, parseScopeString } from "../auth/scopes.js";
import type { Clock } from "../clock.js";
import { issueMachineAccessToken } from "../services/machine-user/access-token.js";
import type { SessionIssuer } from "../services/user/sessions.js";
import type { Storage } from "../storage/orm.js";
import {
  authenticateClient,
  type ClientAuthDeps,
  type OAuthRequest,
  presentsClientSecret,
  scopeParameter,
} from "./form.js";
import { asOAuthError, OAuthError } from "./oauth-error.js";

/** What the token endpoint needs. */
export interface TokenEndpointDeps extends ClientAuthDeps {
  storage: Storage;
  jwt: JwtService;
  sessions: SessionIssuer;
  audit: AuditLog;
  /** auth.jwt.accessTokenTtl */
  accessTokenTtlSeconds: number;
  clock: Clock;
}

/** The RFC 6749 §5.1 answer. */
export interface TokenResponse {
  access_token: string;
  token_type: "Bearer";
  expires_in: number;
  scope: string;
  refresh_token?: string;
}

/** The grants the token endpoint serves. */
export const GRANT_TYPES = ["client_credentials", "refresh_token"] as const;

/** The RPCs whose audit records the grants write: the same records as those RPCs, under their names. */
const ISSUE_ACCESS_TOKEN: DescMethod = MachineUserService.method.issueAccessToken;
const REFRESH_TOKEN: DescMethod = UserService.method.refreshToken;

/**
 * `POST /oauth2/token` (RFC 6749 §3.2), the body already read into `req.form`.
 * @throws OAuthError
 */
export async function tokenEndpoint(deps: TokenEndpointDeps, req: OAuthRequest): Promise<TokenResponse> {
  const grant = req.form.get("grant_type");
  if (grant === undefined) throw new OAuthError("invalid_request", "grant_type is required");
  if (grant === "client_credentials") return audited(deps, req, ISSUE_ACCESS_TOKEN, clientCredentials);
  if (grant === "refresh_token") return audited(deps, req, REFRESH_TOKEN, refreshToken);
  throw new OAuthError("unsupported_grant_type", "grant_type must be client_credentials or refresh_token");
}

/**
 * Run a grant and record it as the RPC it stands for records its calls (the audit
 * interceptor's and admission's record: actor, tenant, outcome, reason, address, request
 * id; the target AUDIT_TARGETS decides; no secret). A refusal by the per-IP limit is counted before and never
 * reaches here, as for RPCs.
 */
async function audited(
  deps: TokenEndpointDeps,
  req: OAuthRequest,
  method: DescMethod,
  grant: (deps: TokenEndpointDeps, req: OAuthRequest) => Promise<TokenResponse>,
): Promise<TokenResponse> {
  try {
    const res = await grant(deps, req);
    auditCall(deps.audit, req.state, method, undefined, "success", null);
    return res;
  } catch (err) {
    auditCall(deps.audit, req.state, method, undefined, "failure", oauthAuditReason(err));
    throw err;
  }
}

/** The audit reason of a failed grant or revocation: Tessera's reason where one was raised, else the OAuth error code. */
export function oauthAuditReason(err: unknown): string {
  if (err instanceof OAuthError) {
    const cause = (err as { cause?: unknown }).cause;
    return cause !== undefined ? auditReason(cause) : err.error.toUpperCase();
  }
  return auditReason(err);
}

/** Throw `asOAuthError(err, stage)` (which keeps `err` as its cause, for the audit reason). */
function rethrow(err: unknown, stage: "client" | "grant" | "scope"): never {
  throw asOAuthError(err, stage);
}

/**
 * client_credentials (RFC 6749 §4.4): a machine user authenticates as the client and gets
 * a short-lived access token, as IssueAccessToken issues it (one implementation); bound to
 * the client certificate when the connection presented one (RFC 8705). `scope` may only
 * narrow the machine user's scopes: checked by assertMayManage, the one rule of what a
 * principal may grant (invalid_scope otherwise).
 */
async function clientCredentials(deps: TokenEndpointDeps, req: OAuthRequest): Promise<TokenResponse> {
  const client = await authenticateClient(deps, req);
  const { principal } = client;
  if (principal.kind !== "machine")
    throw new OAuthError("unauthorized_client", "only a machine user may use the client_credentials grant");
  const requested = scopeParameter(req.form);
  let scopes: readonly string[] = principal.scopes;
  if (requested !== undefined) {
    try {
      assertMayManage(principal, NEW_PRINCIPAL, requested);
    } catch (err) {
      rethrow(err, "scope");
    }
    scopes = parseScopeString(formatScopes(requested));
  }
  let issued: Awaited<ReturnType<typeof issueMachineAccessToken>>;
  try {
    issued = await issueMachineAccessToken(
      { jwt: deps.jwt, accessTokenTtlSeconds: deps.accessTokenTtlSeconds, clock: deps.clock },
      deps.storage.em.fork(),
      principal,
      req.state.certificate,
      scopes,
    );
  } catch (err) {
    rethrow(err, "grant");
  }
  return {
    access_token: issued.token,
    token_type: "Bearer",
    expires_in: expiresIn(issued.expiresAt, deps.clock),
    scope: issued.scopes.join(" "),
  };
}

/**
 * refresh_token (RFC 6749 §6): a user session's rotating refresh token, spent for a new
 * pair as RefreshToken spends it (reuse of a spent token ends the session). Refresh tokens
 * are issued to users' sessions, public clients: no client authentication is needed, and a
 * `client_id` alone, or a client certificate, is ignored. A client that does authenticate
 * (Basic or client_secret_post) must be the token's user.
 * `scope` may narrow the new access token to scopes the user still holds (invalid_scope
 * otherwise, before the token is spent).
 */
async function refreshToken(deps: TokenEndpointDeps, req: OAuthRequest): Promise<TokenResponse> {
  const token = req.form.get("refresh_token");
  let owner: string | undefined;
  // A certificate alone is no client authentication here: only machine users are bound to
  // certificates and they hold no refresh token, so taking it for tls_client_auth refused
  // every user whose connection carries one.
  if (presentsClientSecret(req)) {
    const client = await authenticateClient(deps, req);
    // A machine user holds no refresh token: one naming nobody matches no row.
    owner = client.principal.kind === "user" ? client.principal.id : "";
  }
  if (token === undefined) throw new OAuthError("invalid_request", "refresh_token is required");
  const requested = scopeParameter(req.form);
  let pair: Awaited<ReturnType<SessionIssuer["rotate"]>>;
  try {
    pair = await deps.sessions.rotate(deps.storage.em.fork(), token, {
      ...(requested !== undefined ? { scopes: requested } : {}),
      ...(owner !== undefined ? { owner } : {}),
      resolved: (user) => auditTarget(req.state, { id: user.id, tenantId: user.tenantId }),
    });
  } catch (err) {
    rethrow(err, requested !== undefined ? "scope" : "grant");
  }
  // Not verified again: committed, the pair is the client's, and a token issued in its
  // session's last second may expire before a second look (a 500 that spent the token).
  return {
    access_token: pair.accessToken,
    token_type: "Bearer",
    expires_in: expiresIn(pair.accessTokenExpiresAt, deps.clock),
    scope: pair.scopes.join(" "),
    refresh_token: pair.refreshToken,
  };
}

function expiresIn(at: Date, clock: Clock): number {
  return Math.max(0, Math.floor((at.getTime() - clock()) / 1000));
}
