import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { authRuleFor } from "../admission/auth-rule.js";
import type { CredentialVerifier, Verification } from "../verification/verify-credential.js";
import { type ClientAuthDeps, type OAuthRequest, tokenRequest } from "./form.js";
import { asOAuthError, OAuthError } from "./oauth-error.js";

/** What the introspection endpoint needs. */
export interface IntrospectionEndpointDeps extends ClientAuthDeps {
  /** The verification core VerifyCredential answers from. */
  verifier: CredentialVerifier;
}

/**
 * `POST /oauth2/introspect` (RFC 7662), the body already read into `req.form`: whether a
 * token is active, for a resource server.
 *
 * The client authenticates as at the other OAuth endpoints (form.ts `authenticateClient`:
 * a machine user's Basic pair as client_secret_basic or client_secret_post, a bearer
 * credential, or its bound client certificate alone, with the same per-IP limit and
 * failed-authentication budgets), and is then authorized by VerifyCredential's own rule
 * from the proto (a machine principal holding `auth:verify`; 403 `insufficient_scope`
 * otherwise). The token is verified by the same core as VerifyCredential (src/verification/),
 * with the same tenant wall, the caller's own budget of failed verifications and the same
 * audit record: `{"active": false}` for every invalid token, whatever the reason (RFC 7662
 * §2.2). RATE_LIMITED (that budget is spent) is 429 with Retry-After, not an answer about
 * the token. `token_type_hint` is only a hint (§2.1): every kind is told apart by its shape.
 * @throws OAuthError
 */
export async function introspectionEndpoint(
  deps: IntrospectionEndpointDeps,
  req: OAuthRequest,
): Promise<Record<string, unknown>> {
  const { principal, token } = await tokenRequest(deps, req, VERIFY_RULE());
  let verification: Verification;
  try {
    verification = await deps.verifier.verify(principal, req.state, { credential: token });
  } catch (err) {
    // A fault (storage away): 503 with Retry-After, never an answer about the token.
    throw asOAuthError(err, "grant");
  }
  if (verification.code === "RATE_LIMITED")
    throw new OAuthError("temporarily_unavailable", "too many tokens that did not verify; retry later", 429, {
      "retry-after": String(verification.retryAfterSeconds ?? 1),
    });
  return introspection(verification);
}

/** VerifyCredential's auth rule, read from its descriptor (memoised by authRuleFor). */
const VERIFY_RULE = () => authRuleFor(VerificationService.method.verifyCredential);

/** RFC 7662 §2.2: the members of an active token's answer; `{"active": false}` for any other. */
export function introspection(v: Verification): Record<string, unknown> {
  const p = v.principal;
  if (!v.valid || p === undefined) return { active: false };
  const answer: Record<string, unknown> = {
    active: true,
    scope: p.scopes.join(" "),
    sub: p.id,
    token_type: v.credentialKind === "basic" ? "Basic" : "Bearer",
    tenant_id: p.tenantId,
  };
  if (p.kind === "machine") answer.client_id = p.id;
  if (p.username !== undefined) answer.username = p.username;
  if (p.expiresAt !== undefined && p.expiresAt !== null) answer.exp = Math.floor(p.expiresAt / 1000);
  if (p.issuedAt !== undefined) answer.iat = Math.floor(p.issuedAt / 1000);
  if (p.certificateBinding !== undefined) answer.cnf = { "x5t#S256": p.certificateBinding };
  return answer;
}
