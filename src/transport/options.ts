import type * as http from "node:http";
import type * as http2 from "node:http2";
import type { DescMethod } from "@bufbuild/protobuf";
import type { ConnectError, ConnectRouter, ConnectRouterOptions, ContextValues } from "@connectrpc/connect";
import type { Logger } from "pino";
import type { Verdict, WireError } from "./early-answers.js";
import type { NodeRequest, StreamingHandler, StreamRequest } from "./stream-server.js";
import type { CallErrorHook, UnaryProtocol } from "./unary-protocols.js";

/**
 * The transport's interface: the request handler server.ts installs and the options it is
 * made with, the same for both transports (fast-adapter.ts, stock-adapter.ts).
 */

/**
 * What `createConnectHandler` (fast-adapter.ts) returns: a request listener whose `stream`
 * serves the HTTP/2 streams the unary handlers answer, as a StreamRequest without a response
 * object (stream-server.ts serves both).
 */
export interface ConnectHandler extends StreamingHandler {
  stream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, rawHeaders: string[]): boolean;
  /** The RPC a request path (query string allowed) names, or undefined when none does. */
  methodOf(url: string | undefined): DescMethod | undefined;
}

/** Options of `createConnectHandler`: those of `connectNodeAdapter`. */
export interface ConnectHandlerOptions extends ConnectRouterOptions {
  routes(router: ConnectRouter): void;
  contextValues?: (req: NodeRequest) => ContextValues;
  /**
   * Runs first on a request served from its HTTP/2 stream (a StreamRequest), before anything
   * else reads it: server/request-handler.ts attaches the request's facts there, as it does
   * itself for the requests of the compatibility layer.
   */
  prepare?: (req: StreamRequest) => void;
  /**
   * Runs once a request for a path no RPC serves has been answered 404 (the transport's one
   * 404 answer): to count and log it.
   */
  onNotFound?: (req: NodeRequest) => void;
  /**
   * Rewrite the body of an error response (HTTP status ≥ 400, i.e. a Connect unary error)
   * before it is sent; Content-Length follows the new body. Success responses never pass
   * through it, so it costs nothing on the hot path.
   */
  errorBody?: (req: NodeRequest, body: Uint8Array) => Uint8Array;
  /**
   * Headers every response to a request for an RPC path carries (a request id, security
   * headers…), whatever answers it: set on the response before anything else writes it,
   * or, for a unary answer written onto an HTTP/2 stream, written with it in one go (see
   * writeUnaryAnswer), which spares setting them on the response one by one. Return a new
   * object for each request: the adapter adds the answer's own headers to it.
   */
  responseHeaders?: (req: NodeRequest) => http.OutgoingHttpHeaders;
  /**
   * Runs for every request to an RPC path before Connect sees it, e.g. to refuse callers
   * before their request body is read. Return (or resolve to) undefined to go on into
   * Connect, or a ConnectError to answer with it at once, in the request's protocol, as
   * Connect would (status, headers, trailers, JSON body through `errorBody`), without
   * entering the RPC pipeline: the body is discarded unread, and a client still sending
   * past `readMaxBytes` is stopped. Asked only about requests that can be answered so (a
   * unary call by POST over Connect, gRPC or gRPC-Web); any other goes into Connect
   * unasked, and its admission is the pipeline's. A synchronous result costs no promise. A
   * {@link WireError} answers as a ConnectError would, from the wire form it gives.
   */
  admit?: (req: NodeRequest, method: DescMethod) => Verdict | Promise<Verdict>;
  /**
   * Most bytes a request body may have on the wire, whatever it holds: every message and
   * envelope counted, gRPC-Web trailer frames included (Connect checks each message against
   * `readMaxBytes` but skips trailer frames uncounted). Past it the call fails with
   * ResourceExhausted and the rest of the body is not read. Default: no limit.
   */
  maxBodyBytes?: number;
  /**
   * The error a unary call served by the unary handlers failed with, before it is written:
   * return the error to answer with. Errors Connect raises before the interceptors run
   * (framing, compression, parsing, limits) carry no details of the application's; this
   * lets it add them (a reason, the request id), as its error interceptor does for the rest.
   */
  callError?: CallErrorHook;
  /**
   * The error a call that failed unexpectedly outside the pipeline is answered with: a
   * throw or rejection of `admit` or `callError`, a unary handler or Connect's handler
   * failing (the error interceptor answers what fails inside). It logs `err` once and
   * returns the Internal error (a reason, the request id) that is then written in the
   * call's protocol, as every other error is, unless the answer was already begun. It must
   * not throw. Default: Connect's bare Internal, with `err` logged through `logger`.
   */
  internalError?: (req: NodeRequest, method: DescMethod, err: unknown) => ConnectError;
  /**
   * Where a handler's or `admit`'s unexpected failure is logged (the service's pino logger):
   * never the raw error, which may carry SQL with its parameters, only what
   * `loggableError` keeps. Default: not logged.
   */
  logger?: Pick<Logger, "error">;
  /**
   * Called once for every call to an RPC path when it ends, whichever way: answered by the
   * unary handlers, refused by `admit`, served by Connect's handlers (streams, Connect GET,
   * gRPC-Web text), failed with a 500, or left by the client (Canceled). `code` is 0 for
   * success, else the Connect code the client was (or would have been) answered with.
   * Runs after the answer is handed to Node; for metrics and access logs. It must not throw.
   */
  onCallEnd?: (req: NodeRequest, method: DescMethod, protocol: UnaryProtocol, code: number) => void;
}
