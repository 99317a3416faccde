import type { Interceptor } from "@connectrpc/connect";
import { Code } from "@connectrpc/connect";
import type { Authenticator } from "../auth/authenticator.js";
import { parseCredentials } from "../auth/credentials.js";
import { requestState } from "../context.js";
import { TesseraError } from "../errors.js";
import { type RateLimits, rateLimitedError } from "../rate-limit.js";
import { authRuleFor } from "./auth-rule.js";

/** Dependencies of {@link createAuthnInterceptor}. */
export interface AuthnDeps {
  authenticator: Authenticator;
  /** When set, failed authentications are counted per IP and an IP over the limit is refused before any verification. */
  limits?: RateLimits | undefined;
}

/**
 * Authentication: who is calling. Public methods pass without looking at credentials;
 * every other method needs a credential (or a bound client certificate) that verifies.
 */
export function createAuthnInterceptor(deps: AuthnDeps): Interceptor {
  const { authenticator, limits } = deps;
  return (next) => async (req) => {
    const rule = authRuleFor(req.method);
    if (rule.public) return next(req);
    const state = requestState(req.contextValues);
    if (limits) {
      const blocked = await limits.authFailures.exhausted(state.ip);
      if (blocked)
        throw rateLimitedError(blocked, "too many failed authentication attempts; try again later");
    }
    try {
      const principal = await authenticator.authenticate(parseCredentials(req.header), state);
      if (!principal) throw new TesseraError("AUTH_REQUIRED", "Authentication required");
      state.principal = principal;
    } catch (err) {
      if (
        limits &&
        err instanceof TesseraError &&
        err.code === Code.Unauthenticated &&
        err.reason !== "AUTH_REQUIRED"
      ) {
        await limits.authFailures.consume(state.ip);
      }
      throw err;
    }
    return next(req);
  };
}
