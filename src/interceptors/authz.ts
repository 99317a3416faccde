import type { Interceptor } from "@connectrpc/connect";
import { authorizeCaller } from "../admission.js";
import { requestState } from "../context.js";
import type { RateLimits } from "../rate-limit.js";
import { authRuleFor } from "./auth-rule.js";

/**
 * Authorization: may this principal call this method? The principal's kind must be one
 * the method's rule admits, and its scopes must cover every scope the rule requires.
 * Then the per-principal rate limit applies. Requests the HTTP layer admitted were
 * authorized there (admission.ts; a refusal it left to the pipeline is thrown by the
 * authentication interceptor).
 */
export function createAuthzInterceptor(deps: { limits?: RateLimits | undefined }): Interceptor {
  return (next) => (req) => {
    const rule = authRuleFor(req.method);
    if (rule.public) return next(req);
    const state = requestState(req.contextValues);
    if (state.admission) return next(req);
    return authorizeCaller(rule, state, deps.limits).then(() => next(req));
  };
}
