import type { Interceptor } from "@connectrpc/connect";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Logger } from "pino";
import { type ErrorInfo, ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { type RequestState, requestState } from "../context.js";
import { REQUEST_ID_KEY, toConnectError } from "../errors.js";
import { driverErrorAsTesseraError, loggableError } from "../storage/errors.js";

/**
 * Outermost interceptor: every error leaves as a ConnectError carrying a stable reason
 * and the request id; unexpected errors are logged (with the request id, never the
 * request) and become Internal. Also applies headers other interceptors queued.
 */
export function createErrorInterceptor(deps: { logger: Logger }): Interceptor {
  return (next) => async (req) => {
    const state = requestState(req.contextValues);
    try {
      const res = await next(req);
      if (state.responseHeaders)
        for (const [k, v] of Object.entries(state.responseHeaders)) res.header.set(k, v);
      return res;
    } catch (err) {
      throw toWireError(err, state, `${req.service.typeName}/${req.method.name}`, deps.logger);
    }
  };
}

/**
 * The ConnectError a request that failed with `err` is answered with: reason and request id
 * in its ErrorInfo (also kept in `state.errorInfo` for the JSON envelope), the headers
 * queued in `state.responseHeaders`, and unexpected errors logged as such. Used by the error
 * interceptor, and by the HTTP layer for refusals it answers before the pipeline.
 */
export function toWireError(err: unknown, state: RequestState, method: string, logger: Logger): ConnectError {
  // A database error a handler did not expect is still, mostly, not a bug (storage/errors.ts).
  const ce = toConnectError(driverErrorAsTesseraError(err) ?? err, state.requestId);
  const detail = ce.details[0];
  if (detail && "desc" in detail && detail.desc === ErrorInfoSchema) {
    const info = detail.value as ErrorInfo;
    state.errorInfo = { reason: info.reason, requestId: info.metadata[REQUEST_ID_KEY] ?? state.requestId };
  }
  if (ce.code === Code.Internal || ce.code === Code.Unknown) {
    logger.error(
      {
        requestId: state.requestId,
        method,
        err: err instanceof ConnectError ? err.rawMessage : loggableError(err),
      },
      "request failed",
    );
  }
  if (state.responseHeaders)
    for (const [k, v] of Object.entries(state.responseHeaders))
      if (!ce.metadata.has(k)) ce.metadata.set(k, v);
  return ce;
}
