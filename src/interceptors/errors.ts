import { Code, ConnectError } from "@connectrpc/connect";
import type { Logger } from "pino";
import { type ErrorInfo, ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import type { RequestState } from "../context.js";
import { REQUEST_ID_KEY, toConnectError } from "../errors.js";
import { rateLimitHeaders } from "../rate-limit/refusal.js";
import { driverErrorAsTesseraError, loggableError } from "../storage/errors.js";
import { reportRefusedSession } from "../storage/refused-sessions.js";

/**
 * The ConnectError a request that failed with `err` is answered with: reason and request id
 * in its ErrorInfo (also kept in `state.errorInfo` for the JSON envelope), the X-RateLimit-*
 * headers of the limit in `state.rateLimit`, and unexpected errors logged as such. Used by
 * the error interceptor (index.ts), and by admission for refusals answered before the pipeline.
 */
export function toWireError(err: unknown, state: RequestState, method: string, logger: Logger): ConnectError {
  // A database error a handler did not expect is still, mostly, not a bug (storage/errors.ts).
  const ce = toConnectError(driverErrorAsTesseraError(err) ?? err, state.requestId);
  // An outage that lasts until an operator acts: said at error level, rate-limited.
  if (ce.code === Code.Unavailable) reportRefusedSession(err, logger);
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
  if (state.rateLimit)
    for (const [k, v] of Object.entries(rateLimitHeaders(state.rateLimit)))
      if (!ce.metadata.has(k)) ce.metadata.set(k, v);
  return ce;
}
