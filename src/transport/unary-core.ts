/**
 * What every unary protocol handler shares (unary-connect.ts, unary-grpc.ts): the request and
 * answer types, the request headers they read, and how a failed call's error is made.
 */
import type { OutgoingHttpHeaders } from "node:http";
import { Code, ConnectError, type HandlerContext, type MethodImplSpec } from "@connectrpc/connect";
import type {
  createMethodSerializationLookup,
  UniversalServerRequest,
  validateUniversalHandlerOptions,
} from "@connectrpc/connect/protocol";
import * as connect from "@connectrpc/connect/protocol-connect";
import * as grpc from "@connectrpc/connect/protocol-grpc";
import type { UnaryCall } from "./unary-call.js";

/** The protocols a unary call is served in here. */
export type UnaryProtocol = "connect" | "grpc" | "grpc-web";

/**
 * A request whose body is a byte stream, with Node's header object of the request (what
 * the Node adapter hands over). The handlers read the protocol headers from
 * `nodeHeaders`, so `header` (fetch Headers, made by the adapter when first read) is made
 * only if an interceptor or the implementation reads it: making it is about 2 % of a
 * unary call, and Tessera's interceptors read the Node headers instead.
 */
export type UnaryRequest = UniversalServerRequest & {
  body: AsyncIterable<Uint8Array>;
  nodeHeaders: Readonly<Record<string, string | string[] | undefined>>;
};

/**
 * Header `name` (lower case) of the request: what `req.header.get(name)` gives. Node gives
 * values without surrounding whitespace (nghttp2 refuses header fields that have it, and
 * llhttp strips it), as fetch Headers would leave them, and repeated fields as a list.
 */
export function headerOf(req: UnaryRequest, name: string): string | null {
  const value = req.nodeHeaders[name];
  if (value === undefined) return null;
  return typeof value === "string" ? value : value.join(", ");
}

/** The request headers the handlers read, by their Node (lower-case) names. */
export const H = {
  contentType: connect.headerContentType.toLowerCase(),
  connectTimeout: connect.headerTimeout.toLowerCase(),
  connectEncoding: connect.headerUnaryEncoding.toLowerCase(),
  connectAcceptEncoding: connect.headerUnaryAcceptEncoding.toLowerCase(),
  contentLength: connect.headerUnaryContentLength.toLowerCase(),
  grpcTimeout: grpc.headerTimeout.toLowerCase(),
  grpcEncoding: grpc.headerEncoding.toLowerCase(),
  grpcAcceptEncoding: grpc.headerAcceptEncoding.toLowerCase(),
};

/**
 * The whole answer to a unary call: status, headers, the body in one piece, and HTTP
 * trailers (gRPC only), as Node header objects (lower-case names, set-cookie a list).
 */
export interface UnaryAnswer {
  status: number;
  header: OutgoingHttpHeaders;
  body: Uint8Array;
  trailer?: OutgoingHttpHeaders;
  /**
   * True when the headers and trailers are only those the protocol sets (valid, lower
   * case): nothing the interceptors or the implementation set needs checking.
   */
  plain: boolean;
  /** True when an error's body is already what is sent: the `errorBody` option does not rewrite it. */
  final?: boolean;
  /** How the call ended: 0 for success, else the Connect code it failed with (metrics, access log). */
  code: number;
}

export type UnaryHandler = (req: UnaryRequest) => Promise<UnaryAnswer>;

/** A request's headers by lower-case name, as fetch Headers' `get` reads them. */
export interface RequestHeaders {
  get(name: string): string | null;
}

/**
 * Called with the error a unary call failed with, before it is written (see
 * `ConnectHandlerOptions.callError`); returns the error to answer with, or a promise of it.
 */
export type CallErrorHook = (
  error: ConnectError,
  values: HandlerContext["values"],
  method: UnarySpec["method"],
  headers: RequestHeaders,
) => ConnectError | Promise<ConnectError>;

export type HandlerOptions = ReturnType<typeof validateUniversalHandlerOptions> & {
  callError?: CallErrorHook | undefined;
};
export type UnarySpec = Extract<MethodImplSpec, { kind: "unary" }>;
export type Lookup = ReturnType<typeof createMethodSerializationLookup>;

/**
 * What the signal of a finished call is aborted with: the same kind of AbortError that
 * `abort()` without a reason gives, made once, so that ending a call builds no
 * DOMException (and captures no stack trace) per request.
 */
export const CALL_DONE = new DOMException("This operation was aborted", "AbortError");

/** Fetch Headers as a Node header object (set-cookie kept as a list). */
export function nodeHeaders(header: Headers): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  header.forEach((value, key) => {
    out[key] = value;
  });
  const cookies = header.getSetCookie();
  if (cookies.length > 0) out["set-cookie"] = cookies;
  return out;
}

/** The error to answer a failed call with: `error`, or what the options' `callError` makes of it. */
export function callError(
  opt: HandlerOptions,
  error: ConnectError,
  context: UnaryCall,
  spec: UnarySpec,
  req: UnaryRequest,
): ConnectError | Promise<ConnectError> {
  return opt.callError
    ? opt.callError(error, context.values, spec.method, { get: (name) => headerOf(req, name) })
    : error;
}

/** Connect's handlers answer anything else thrown as an internal error (the cause kept for logs only). */
export function asConnectError(e: unknown): ConnectError {
  return e instanceof ConnectError
    ? e
    : new ConnectError("internal error", Code.Internal, undefined, undefined, e);
}
