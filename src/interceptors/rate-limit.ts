import type { Interceptor } from "@connectrpc/connect";
import { requestState } from "../context.js";
import { type RateLimits, rateLimitedError, rateLimitHeaders } from "../rate-limit.js";

/**
 * Per-IP rate limit, inside the router so that every protocol sees ResourceExhausted
 * (a bare HTTP 429 in front of the adapter reads as Unavailable to Connect clients).
 */
export function createRateLimitInterceptor(deps: { limits: RateLimits }): Interceptor {
  return (next) => async (req) => {
    const state = requestState(req.contextValues);
    const result = await deps.limits.perIp.consume(state.ip);
    if (!result.allowed) throw rateLimitedError(result);
    state.responseHeaders = rateLimitHeaders(result);
    return next(req);
  };
}
