import type { Interceptor } from "@connectrpc/connect";
import { type AdmissionDeps, authenticateCaller } from "../admission.js";
import { requestState } from "../context.js";
import { authRuleFor } from "./auth-rule.js";

/** Dependencies of {@link createAuthnInterceptor}. */
export type AuthnDeps = AdmissionDeps;

/**
 * Authentication: who is calling. Public methods pass without looking at credentials;
 * every other method needs a credential (or a bound client certificate) that verifies.
 * Where the HTTP layer already authenticated the request (admission, see admission.ts),
 * this only throws the refusal it left for the pipeline to answer (`admission.refused`).
 */
export function createAuthnInterceptor(deps: AuthnDeps): Interceptor {
  return (next) => (req) => {
    const rule = authRuleFor(req.method);
    if (rule.public) return next(req);
    const state = requestState(req.contextValues);
    const admission = state.admission;
    if (admission) {
      if (admission.refused !== undefined) return Promise.reject(admission.refused);
      return next(req);
    }
    return authenticateCaller(deps, req.header, state).then(() => next(req));
  };
}
