import type { Interceptor } from "@connectrpc/connect";
import { auditCall, auditReason } from "../admission/audit.js";
import { authRuleFor } from "../admission/auth-rule.js";
import type { AuditLog } from "../audit.js";
import { requestState } from "../context.js";

/**
 * Audit interceptor: records every call admission let in to a method whose rule says
 * `audit`, successful or failed, with actor, action, target id and outcome. The calls
 * admission refuses are recorded by admission itself (src/admission/), which this runs after.
 */
export function createAuditInterceptor(deps: { audit: AuditLog }): Interceptor {
  return (next) => (req) => {
    // Reads are not written: they pass straight on, without an async frame of their own.
    if (!authRuleFor(req.method).audit) return next(req);
    return audited(next, req);
  };

  async function audited(next: Parameters<Interceptor>[0], req: Parameters<Parameters<Interceptor>[0]>[0]) {
    const state = requestState(req.contextValues);
    const message = req.stream ? undefined : req.message;
    try {
      const res = await next(req);
      auditCall(deps.audit, state, req.method, message, "success", null);
      return res;
    } catch (err) {
      auditCall(deps.audit, state, req.method, message, "failure", auditReason(err));
      throw err;
    }
  }
}
