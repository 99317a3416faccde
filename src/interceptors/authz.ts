import type { Interceptor } from "@connectrpc/connect";
import { admits } from "../auth/principal.js";
import { hasAllScopes } from "../auth/scopes.js";
import { requestState } from "../context.js";
import { TesseraError, wwwAuthenticate } from "../errors.js";
import { type RateLimits, rateLimitedError, rateLimitHeaders } from "../rate-limit.js";
import { authRuleFor } from "./auth-rule.js";

/**
 * Authorization: may this principal call this method? The principal's kind must be one
 * the method's rule admits, and its scopes must cover every scope the rule requires.
 * Then the per-principal rate limit applies.
 */
export function createAuthzInterceptor(deps: { limits?: RateLimits | undefined }): Interceptor {
  return (next) => async (req) => {
    const rule = authRuleFor(req.method);
    if (rule.public) return next(req);
    const state = requestState(req.contextValues);
    const principal = state.principal;
    if (!principal) throw new TesseraError("AUTH_REQUIRED", "Authentication required");
    if (!rule.principals.some((kind) => admits(kind, principal))) {
      throw new TesseraError(
        "PRINCIPAL_NOT_ALLOWED",
        `this method is not available to ${principal.kind} principals`,
      );
    }
    if (!hasAllScopes(principal.scopes, rule.scopes)) {
      throw new TesseraError("ACCESS_DENIED", "Insufficient permissions", {
        headers: { "www-authenticate": wwwAuthenticate("ACCESS_DENIED", "", rule.scopes) },
        metadata: { required_scopes: rule.scopes.join(" ") },
      });
    }
    if (deps.limits) {
      const result = await deps.limits.perPrincipal.consume(`${principal.kind}:${principal.id}`);
      if (!result.allowed) throw rateLimitedError(result);
      // The tighter of the two limits is the one a client should pace itself by.
      const current = state.responseHeaders;
      if (!current || Number(current["x-ratelimit-remaining"]) > result.remaining)
        state.responseHeaders = rateLimitHeaders(result);
    }
    return next(req);
  };
}
