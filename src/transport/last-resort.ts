import type * as http from "node:http";
import type * as http2 from "node:http2";
import type { DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { loggableError } from "../storage/errors.js";
import { answerDate } from "./answer-date.js";
import {
  type EarlyProtocol,
  earlyAnswer,
  refuseStream,
  setHeaders,
  writeUnaryAnswer,
} from "./early-answers.js";
import type { ConnectHandlerOptions } from "./options.js";
import type { NodeRequest, NodeResponse, StreamRequest } from "./stream-server.js";

/**
 * The last resort: a call that failed where no interceptor catches (`admit` or `callError`
 * throwing, a handler rejecting) is still answered as every other error is, in its protocol
 * with the application's ErrorInfo (a reason, the request id: `options.internalError`), and
 * its cause logged once; never a bare 500 without a body, nor the cause's text on the wire.
 */

/** The Internal error `err` is answered with (see `ConnectHandlerOptions.internalError`). */
export function internalErrorOf(
  options: Pick<ConnectHandlerOptions, "internalError" | "logger">,
  req: NodeRequest,
  method: DescMethod,
  err: unknown,
  what: string,
): ConnectError {
  if (options.internalError !== undefined) {
    try {
      return options.internalError(req, method, err);
    } catch (again) {
      err = again;
    }
  }
  options.logger?.error(
    { method: `${method.parent.typeName}/${method.name}`, err: loggableError(err) },
    what,
  );
  return err instanceof ConnectError
    ? err
    : new ConnectError("internal error", Code.Internal, undefined, undefined, err);
}

/**
 * Answer a call that failed unexpectedly with `error` (`internalErrorOf`), in its protocol
 * (`protocol`: a unary call's, else a stream's, by its content type), unless its answer was
 * begun already: then the stream or response is cut, as a client must not take a half
 * answer for a whole one.
 */
export function answerFailedCall(
  req: NodeRequest,
  res: NodeResponse | undefined,
  protocol: EarlyProtocol | undefined,
  error: ConnectError,
  options: Pick<ConnectHandlerOptions, "errorBody" | "jsonOptions" | "maxBodyBytes">,
  common: http.OutgoingHttpHeaders | undefined,
): void {
  if (res === undefined) {
    const { stream } = req as StreamRequest;
    // `respond` throws on a stream already closed (reset by the client): nothing to answer then.
    if (stream.headersSent || stream.closed || stream.destroyed) stream.destroy();
    else if (protocol !== undefined)
      writeUnaryAnswer(
        earlyAnswer(protocol, error, options.jsonOptions),
        req,
        res,
        options.errorBody,
        common,
      );
    else stream.respond({ ...common, ":status": 500, date: answerDate() }, { endStream: true });
  } else if (res.headersSent || res.writableEnded) {
    res.destroy();
  } else if (protocol !== undefined) {
    writeUnaryAnswer(earlyAnswer(protocol, error, options.jsonOptions), req, res, options.errorBody, common);
  } else {
    setHeaders(res, common);
    refuseStream(req as http.IncomingMessage | http2.Http2ServerRequest, res, error, options.maxBodyBytes);
  }
}
