import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import type { Logger } from "pino";
import { auditCall, auditReason } from "../admission/audit.js";
import { authRuleFor } from "../admission/auth-rule.js";
import type { AuditLog } from "../audit.js";
import { type RequestState, requestState } from "../context.js";
import { rateLimitValues } from "../rate-limit/refusal.js";
import { setResponseHeaders } from "../transport/call-context.js";
import { toWireError } from "./errors.js";
import { assertInputMessage } from "./input.js";

/**
 * The interceptors around every call, in the order app.ts chains them: errors (outermost),
 * admission (src/admission/index.ts), audit, input checks (innermost), then the service
 * method. Each only decides where the call goes; what it computes is beside it: an error's
 * wire form (errors.ts), an audit record (admission/audit.ts), the input checks (input.ts).
 */

/**
 * Outermost interceptor: every error leaves as a ConnectError carrying a stable reason
 * and the request id; unexpected errors are logged (with the request id, never the
 * request) and become Internal. Also sets the X-RateLimit-* headers of the limit admission
 * counted.
 */
export function createErrorInterceptor(deps: { logger: Logger }): Interceptor {
  // Not an async function: every call passes here, and the answer in one `then` is an async
  // frame and its await less per call. Whatever throws, here or in `next`, still leaves as a
  // rejection with the wire error, as from the async function it was.
  return (next) => (req) => {
    const state = requestState(req.contextValues);
    const fail = (err: unknown): never => {
      throw toWireError(err, state, nameOf(req), deps.logger);
    };
    const answered = (res: Awaited<ReturnType<typeof next>>) => {
      try {
        if (state.rateLimit) setResponseHeaders(res, rateLimitValues(state.rateLimit));
        if (!res.stream) return res;
        return { ...res, message: streamAnswered(res.message, req.signal, state, nameOf(req), deps.logger) };
      } catch (err) {
        return fail(err);
      }
    };
    try {
      return Promise.resolve(next(req)).then(answered, fail);
    } catch (err) {
      return Promise.reject(toWireError(err, state, nameOf(req), deps.logger));
    }
  };
}

/** A call's method as errors are logged: `package.Service/Method`. */
function nameOf(req: { service: { typeName: string }; method: { name: string } }): string {
  return `${req.service.typeName}/${req.method.name}`;
}

/**
 * A stream's messages, with the errors that surface while it is iterated (past the
 * interceptor's `await`) answered like any other: a reason and the request id. And a stream
 * whose deadline passed ends DeadlineExceeded: Connect ends with OK one whose implementation
 * returns once its signal aborted (Tessera's streams end so), and gRPC ends a call whose
 * deadline expired with DEADLINE_EXCEEDED; a client must not take the cut for an end the
 * service chose (a drain, a lifetime).
 */
async function* streamAnswered<T>(
  messages: AsyncIterable<T>,
  signal: AbortSignal,
  state: RequestState,
  method: string,
  logger: Logger,
): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (err) {
    throw toWireError(err, state, method, logger);
  }
  const reason: unknown = signal.aborted ? signal.reason : undefined;
  if (reason instanceof ConnectError && reason.code === Code.DeadlineExceeded)
    throw toWireError(reason, state, method, logger);
}

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

/**
 * Validates every string field of a unary request before the implementation sees it:
 * one layer for the whole API, generated from the descriptors, so no field can be
 * forgotten. Runs after authentication and authorization (innermost), so a caller who
 * may not call a method learns nothing from it. Streaming requests (reflection) never
 * reach the database and are left alone.
 */
export function createInputInterceptor(): Interceptor {
  return (next) => (req) => {
    if (!req.stream) assertInputMessage(req.method.input, req.message);
    return next(req);
  };
}
