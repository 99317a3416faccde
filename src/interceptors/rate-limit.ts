import type { Interceptor } from "@connectrpc/connect";
import { countRequest } from "../admission.js";
import { requestState } from "../context.js";
import type { RateLimits } from "../rate-limit.js";

/**
 * Per-IP rate limit, inside the router so that every protocol sees ResourceExhausted
 * (a bare HTTP 429 in front of the adapter reads as Unavailable to Connect clients).
 * Requests the HTTP layer admitted were counted there (admission.ts).
 */
export function createRateLimitInterceptor(deps: { limits: RateLimits }): Interceptor {
  return (next) => (req) => {
    const state = requestState(req.contextValues);
    const admission = state.admission;
    if (admission) {
      if (admission.limited !== undefined) return Promise.reject(admission.limited);
      return next(req);
    }
    return countRequest(deps.limits, state).then(() => next(req));
  };
}
