/**
 * Unary RPCs over Connect (POST), gRPC and gRPC-Web without Connect's streaming pipeline.
 *
 * Why this is written here: @connectrpc/connect serves a unary call over gRPC and gRPC-Web
 * through the same chain of async generators as a bidirectional stream (prepend, split,
 * decompress, parse, invoke, serialize, compress, join, catch: ten generators and the
 * promises between them for one message each way). Profiled under load, that chain and
 * the garbage it leaves cost more than half of a unary gRPC call (about 2.3× the same
 * call over Connect JSON). Its Connect unary handler is direct, but ends every call with
 * `abort()` on the context's AbortController, which builds a DOMException with a captured
 * stack trace. No option of the library changes either, and no other library serves
 * these protocols on Connect's router.
 *
 * What is hand-written is the control flow of a unary call, the same for every protocol
 * (read one message, invoke, write one message), and the handler context with the call of
 * the interceptors and the implementation, whose signal and headers are made only when
 * read (see `UnaryCall`). Every protocol detail is Connect's own exported code, called as
 * its handlers call it: content types, timeouts, compression negotiation, envelopes,
 * (de)serialization with its size limits, error JSON, HTTP status mapping, gRPC
 * trailers. Error messages and codes are those of Connect's handlers, and
 * test/unary-handlers.test.ts compares the two byte for byte, over every protocol, for
 * successes and for each kind of failure. Streaming calls, Connect GET and gRPC-Web text
 * stay with Connect.
 */
import type { OutgoingHttpHeaders } from "node:http";
import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createContextValues,
  type HandlerContext,
  type UnaryRequest as InterceptedRequest,
  type UnaryResponse as InterceptedResponse,
  type Interceptor,
  type MethodImplSpec,
} from "@connectrpc/connect";
import {
  type Compression,
  compressionNegotiate,
  createMethodSerializationLookup,
  encodeEnvelope,
  envelopeCompress,
  envelopeDecompress,
  getAbortSignalReason,
  readAllBytes,
  type Serialization,
  type UniversalHandlerOptions,
  type UniversalServerRequest,
  validateUniversalHandlerOptions,
} from "@connectrpc/connect/protocol";
import * as connect from "@connectrpc/connect/protocol-connect";
import * as grpc from "@connectrpc/connect/protocol-grpc";
import * as grpcWeb from "@connectrpc/connect/protocol-grpc-web";

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
function headerOf(req: UnaryRequest, name: string): string | null {
  const value = req.nodeHeaders[name];
  if (value === undefined) return null;
  return typeof value === "string" ? value : value.join(", ");
}

/** The request headers the handlers read, by their Node (lower-case) names. */
const H = {
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

type HandlerOptions = ReturnType<typeof validateUniversalHandlerOptions> & {
  callError?: CallErrorHook | undefined;
};
type UnarySpec = Extract<MethodImplSpec, { kind: "unary" }>;
type Lookup = ReturnType<typeof createMethodSerializationLookup>;

/**
 * What the signal of a finished call is aborted with: the same kind of AbortError that
 * `abort()` without a reason gives, made once, so that ending a call builds no
 * DOMException (and captures no stack trace) per request.
 */
const CALL_DONE = new DOMException("This operation was aborted", "AbortError");

/**
 * The unary handlers for one method, by protocol, for the router options `options`
 * (Connect's own, as given to its router); a protocol the options switch off has none.
 * Connect unary calls that must carry `Connect-Protocol-Version`
 * (`requireConnectProtocolHeader`) are left to Connect as well.
 */
export function createUnaryHandlers(
  options: Partial<UniversalHandlerOptions> & {
    connect?: boolean;
    grpc?: boolean;
    grpcWeb?: boolean;
    callError?: CallErrorHook;
  },
  spec: UnarySpec,
): Partial<Record<UnaryProtocol, UnaryHandler>> {
  const opt: HandlerOptions = { ...validateUniversalHandlerOptions(options), callError: options.callError };
  const serialization = clientFaultParsing(
    createMethodSerializationLookup(spec.method, opt.binaryOptions, opt.jsonOptions, opt),
  );
  const handlers: Partial<Record<UnaryProtocol, UnaryHandler>> = {};
  if (options.connect !== false && !opt.requireConnectProtocolHeader)
    handlers.connect = connectUnary(opt, spec, serialization);
  if (options.grpc !== false) handlers.grpc = grpcUnary(opt, spec, serialization, false);
  if (options.grpcWeb !== false) handlers["grpc-web"] = grpcUnary(opt, spec, serialization, true);
  return handlers;
}

/** The Connect protocol's unary POST, as Connect's `createUnaryHandler` serves it. */
function connectUnary(opt: HandlerOptions, spec: UnarySpec, serialization: Lookup): UnaryHandler {
  return async function handleConnectUnary(req) {
    const type = connect.parseContentType(headerOf(req, H.contentType));
    const binary = type?.binary === true;
    const timeout = connect.parseTimeout(headerOf(req, H.connectTimeout), opt.maxTimeoutMs);
    const contentType = binary ? connect.contentTypeUnaryProto : connect.contentTypeUnaryJson;
    const context = new UnaryCall(
      spec.method,
      "connect",
      req,
      opt.shutdownSignal,
      timeout.timeoutMs,
      { "content-type": contentType },
      undefined,
    );
    const compression = compressionNegotiate(
      opt.acceptCompression,
      headerOf(req, H.connectEncoding),
      headerOf(req, H.connectAcceptEncoding),
      connect.headerUnaryAcceptEncoding,
    );
    let status = 200;
    let code = 0;
    let body: Uint8Array;
    try {
      if (compression.error) throw compression.error;
      if (timeout.error) throw timeout.error;
      let bytes = await readAllBytes(req.body, opt.readMaxBytes, headerOf(req, H.contentLength));
      if (compression.request) bytes = await compression.request.decompress(bytes, opt.readMaxBytes);
      const input = serialization.getI(binary).parse(bytes);
      const output = await invokeUnary(spec, context, input, opt.interceptors);
      body = serialization.getO(binary).serialize(output);
    } catch (e) {
      context.abort(e);
      const answered = callError(opt, asConnectError(e), context, spec, req);
      const error = answered instanceof Promise ? await answered : answered;
      code = error.code;
      status = connect.codeToHttpStatus(error.code);
      context.responseHeader.set(connect.headerContentType, connect.contentTypeUnaryJson);
      error.metadata.forEach((value, key) => {
        context.responseHeader.set(key, value);
      });
      body = connect.errorToJsonBytes(error, opt.jsonOptions ?? {});
    } finally {
      context.abort(CALL_DONE);
    }
    let encoding: string | undefined;
    if (compression.response && body.byteLength >= opt.compressMinBytes) {
      body = await compression.response.compress(body);
      encoding = compression.response.name;
    }
    let header: OutgoingHttpHeaders;
    if (context.responseTouched) {
      if (encoding !== undefined) context.responseHeader.set(connect.headerUnaryEncoding, encoding);
      header = nodeHeaders(connect.trailerMux(context.responseHeader, context.responseTrailer));
    } else {
      // Nothing read or changed the response headers or trailers: what they would hold.
      header = { "content-type": contentType };
      if (encoding !== undefined) header["content-encoding"] = encoding;
    }
    header["content-length"] = body.byteLength.toString(10);
    return { status, header, body, plain: !context.responseTouched, code };
  };
}

/**
 * gRPC and gRPC-Web unary calls, as Connect's gRPC and gRPC-Web handlers serve them:
 * status 200, the response headers, the enveloped message, and the status in the
 * trailers (gRPC: HTTP trailers; gRPC-Web: a trailer frame at the end of the body).
 */
function grpcUnary(opt: HandlerOptions, spec: UnarySpec, serialization: Lookup, web: boolean): UnaryHandler {
  const protocolName = web ? "grpc-web" : "grpc";
  const types = web ? grpcWeb : grpc;
  return async function handleGrpcUnary(req) {
    const binary = types.parseContentType(headerOf(req, H.contentType))?.binary !== false;
    const timeout = grpc.parseTimeout(headerOf(req, H.grpcTimeout), opt.maxTimeoutMs);
    const compression = compressionNegotiate(
      opt.acceptCompression,
      headerOf(req, H.grpcEncoding),
      headerOf(req, H.grpcAcceptEncoding),
      grpc.headerAcceptEncoding,
    );
    const initialHeader: Record<string, string> = {
      "content-type": binary ? types.contentTypeProto : types.contentTypeJson,
    };
    if (compression.response) initialHeader["grpc-encoding"] = compression.response.name;
    const context = new UnaryCall(
      spec.method,
      protocolName,
      req,
      opt.shutdownSignal,
      timeout.timeoutMs,
      initialHeader,
      GRPC_OK,
    );
    let message: Uint8Array | undefined;
    let code = 0;
    try {
      if (compression.error) throw compression.error;
      if (timeout.error) throw timeout.error;
      const input = await readOneEnvelopedMessage(
        req.body,
        opt.readMaxBytes,
        compression.request,
        serialization.getI(binary),
        web ? grpcWeb.trailerFlag : undefined,
      );
      const output = await invokeUnary(spec, context, input, opt.interceptors);
      const env = await envelopeCompress(
        { flags: 0, data: serialization.getO(binary).serialize(output) },
        compression.response,
        opt.compressMinBytes,
      );
      message = encodeEnvelope(env.flags, env.data);
      context.abort(CALL_DONE);
    } catch (e) {
      context.abort(e);
      const answered = callError(opt, asConnectError(e), context, spec, req);
      const error = answered instanceof Promise ? await answered : answered;
      code = error.code;
      grpc.setTrailerStatus(context.responseTrailer, error);
    }
    // Nothing read or changed the response headers or trailers: what they would hold.
    const touched = context.responseTouched;
    const header = touched ? nodeHeaders(context.responseHeader) : { ...initialHeader };
    if (!web) {
      const trailer = touched ? nodeHeaders(context.responseTrailer) : { ...GRPC_OK };
      return { status: 200, header, body: message ?? EMPTY, trailer, plain: !touched, code };
    }
    const trailer = await envelopeCompress(
      {
        flags: grpcWeb.trailerFlag,
        data: touched ? grpcWeb.trailerSerialize(context.responseTrailer) : GRPC_WEB_OK,
      },
      compression.response,
      opt.compressMinBytes,
    );
    const frame = encodeEnvelope(trailer.flags, trailer.data);
    return { status: 200, header, body: message ? concat(message, frame) : frame, plain: !touched, code };
  };
}

const EMPTY = new Uint8Array(0);
/** The trailers of a successful gRPC call, and their gRPC-Web trailer frame's data. */
const GRPC_OK: Readonly<Record<string, string>> = { "grpc-status": grpc.grpcStatusOk };
const GRPC_WEB_OK = grpcWeb.trailerSerialize(new Headers(GRPC_OK));

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

/**
 * The handler context of a unary call: what Connect's `createHandlerContext` gives the
 * interceptors and the implementation (the same members, and a real AbortSignal that
 * aborts when the client goes away, when the deadline passes, on shutdown, and when the
 * call ends), built with less, and how the call ends it (`abort`, as Connect's
 * `HandlerContextController`).
 *
 * Connect's makes two AbortControllers per call (one for a deadline even when there is
 * none) linked by listeners on both, copies the request headers and makes the response
 * headers and trailers. Here a timer runs only for a deadline, and what a call rarely
 * uses is made when first read: the request's Headers (by the adapter, for this call
 * alone), the response headers and trailers (see `responseHeader`), and the AbortSignal.
 * Node's AbortSignal is an EventTarget whose making, linking and aborting cost about 8 %
 * of a unary call in profiles, and no interceptor or implementation of Tessera's unary
 * RPCs reads it. Until it is read, the first reason the call was aborted with (the
 * request's or the shutdown signal's, the deadline's, the call's end) is kept, and a
 * signal made later starts in that state; test/unary-handlers.test.ts checks this against
 * Connect's, read during and after the call.
 *
 * A class, with getters on its prototype: an object literal with a getter gets a hidden
 * class of its own each time, which under load doubled the time of young generation GCs
 * (seen with `--trace-gc`).
 */
class UnaryCall implements HandlerContext {
  readonly service: HandlerContext["service"];
  readonly requestMethod: string;
  readonly values: HandlerContext["values"];
  readonly url: string;
  readonly timeoutMs: () => number | undefined;
  #controller: AbortController | undefined;
  /** Why the call was aborted, while no signal exists yet. */
  #early: { reason: unknown } | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #onAbort: ((this: AbortSignal) => void) | undefined;
  #responseHeader: Headers | undefined;
  #responseTrailer: Headers | undefined;

  /**
   * `initialHeader` and `initialTrailer` are what the protocol's handler sets before the
   * call (content type, status "0"...): the response headers and trailers start with them.
   */
  constructor(
    readonly method: UnarySpec["method"],
    readonly protocolName: UnaryProtocol,
    private readonly request: UnaryRequest,
    private readonly shutdownSignal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    private readonly initialHeader: Readonly<Record<string, string>>,
    private readonly initialTrailer: Readonly<Record<string, string>> | undefined,
  ) {
    this.service = method.parent;
    this.requestMethod = request.method;
    this.values = request.contextValues ?? createContextValues();
    this.url = request.url;
    if (timeoutMs === undefined) {
      this.timeoutMs = noDeadline;
      return;
    }
    const deadline = Date.now() + timeoutMs;
    this.timeoutMs = () => deadline - Date.now();
    const expire = () => this.abort(new ConnectError("the operation timed out", Code.DeadlineExceeded));
    if (timeoutMs <= 0) expire();
    else this.#timer = setTimeout(expire, timeoutMs);
  }

  /**
   * The response headers and trailers, made when first read. Until then they hold only
   * their initial values (`responseTouched` is false), and the handlers write those
   * without making fetch Headers at all.
   */
  get responseHeader(): Headers {
    if (this.#responseHeader === undefined) this.#responseHeader = new Headers(this.initialHeader);
    return this.#responseHeader;
  }

  get responseTrailer(): Headers {
    if (this.#responseTrailer === undefined) this.#responseTrailer = new Headers(this.initialTrailer);
    return this.#responseTrailer;
  }

  get responseTouched(): boolean {
    return this.#responseHeader !== undefined || this.#responseTrailer !== undefined;
  }

  /** The request's headers, made by the adapter when first read (see `UnaryRequest`). */
  get requestHeader(): Headers {
    return this.request.header;
  }

  get signal(): AbortSignal {
    if (this.#controller !== undefined) return this.#controller.signal;
    const controller = new AbortController();
    this.#controller = controller;
    const aborted = this.#early ?? this.#linkedAbort();
    if (aborted !== undefined) {
      controller.abort(aborted.reason);
    } else {
      const call = this;
      this.#onAbort = function onAbort(this: AbortSignal) {
        call.abort(getAbortSignalReason(this));
      };
      this.request.signal.addEventListener("abort", this.#onAbort);
      this.shutdownSignal?.addEventListener("abort", this.#onAbort);
    }
    return controller.signal;
  }

  /** Abort the call's signal (the first reason stays); the call ends with `abort(CALL_DONE)`. */
  abort = (reason?: unknown): void => {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    const controller = this.#controller;
    if (controller === undefined) {
      // A linked signal that aborted first gives the reason, as its listener would have.
      this.#early ??= this.#linkedAbort() ?? { reason };
      return;
    }
    if (this.#onAbort !== undefined) {
      this.request.signal.removeEventListener("abort", this.#onAbort);
      this.shutdownSignal?.removeEventListener("abort", this.#onAbort);
      this.#onAbort = undefined;
    }
    if (!controller.signal.aborted) controller.abort(reason);
  };

  #linkedAbort(): { reason: unknown } | undefined {
    if (this.request.signal.aborted) return { reason: getAbortSignalReason(this.request.signal) };
    if (this.shutdownSignal?.aborted) return { reason: getAbortSignalReason(this.shutdownSignal) };
    return undefined;
  }
}

const noDeadline = () => undefined;

/**
 * The interceptor chain, then the implementation, as Connect's `invokeUnaryImplementation`
 * runs them: the same request and response objects for the interceptors (the same
 * members, with the same values), the same context for the implementation (the call's,
 * with what the interceptors passed on), the output made a full message, and the
 * response headers and trailers the interceptors returned copied into the call's.
 *
 * Why not Connect's own: it reads the context's `signal` into the interceptors' request
 * and spreads the context for the implementation, so the AbortSignal that `UnaryCall`
 * makes only on demand would be made on every call. Here `signal` is a getter of both,
 * reading the call's signal when someone reads it. The chain is built per call, as
 * Connect builds it.
 */
async function invokeUnary(
  spec: UnarySpec,
  call: UnaryCall,
  input: MessageShape<DescMessage>,
  interceptors: Interceptor[],
): Promise<MessageShape<DescMessage>> {
  const { method } = spec;
  let next = async (req: InterceptedRequest): Promise<InterceptedResponse> => {
    const output = await spec.impl(req.message, new ImplementationContext(call, req));
    return new CallResponse(call, create(method.output, output));
  };
  for (let i = interceptors.length - 1; i >= 0; i--)
    next = interceptors[i]!(next as Parameters<Interceptor>[0]) as typeof next;
  const res = await next(new CallRequest(call, input));
  // The call's own response has the call's headers and trailers; one an interceptor made
  // has its own (Connect copies them into the call's). A copy of the call's response
  // (`{ ...res }`) dropped the getters, and so has the call's, as it had.
  if (!(res instanceof CallResponse)) {
    const { header, trailer } = res as Partial<InterceptedResponse>;
    if (header !== undefined) copyHeaders(header, call.responseHeader);
    if (trailer !== undefined) copyHeaders(trailer, call.responseTrailer);
  }
  return res.message;
}

/** What the request and the response the interceptors see share: the call's method and service, and one message. */
abstract class CallMessage {
  readonly stream = false;
  readonly method: UnarySpec["method"];
  readonly service: HandlerContext["service"];

  constructor(
    protected readonly call: UnaryCall,
    readonly message: MessageShape<DescMessage>,
  ) {
    this.method = call.method;
    this.service = call.service;
  }
}

/** The implementation's response as the interceptors see it (Connect's `UnaryResponse`), its `header` and `trailer` the call's, made when read. */
class CallResponse extends CallMessage implements InterceptedResponse {
  get header(): Headers {
    return this.call.responseHeader;
  }

  get trailer(): Headers {
    return this.call.responseTrailer;
  }
}

/** The request the interceptors see (Connect's `UnaryRequest`), its `header` and `signal` the call's, made when read. */
class CallRequest extends CallMessage implements InterceptedRequest {
  readonly requestMethod: string;
  readonly url: string;
  readonly contextValues: HandlerContext["values"];

  constructor(call: UnaryCall, message: MessageShape<DescMessage>) {
    super(call, message);
    this.requestMethod = call.requestMethod;
    this.url = call.url;
    this.contextValues = call.values;
  }

  get header(): Headers {
    return this.call.requestHeader;
  }

  get signal(): AbortSignal {
    return this.call.signal;
  }
}

/**
 * The implementation's context: the call's (response headers and trailers through getters,
 * made when first read), with the service, headers, signal and values of the request the
 * interceptors passed on (Connect's `mergeRequest`). An interceptor that passed on a copy
 * of the request (`{ ...req }`) dropped the getters `header` and `signal`; the call's
 * own, which they were, stand in.
 */
class ImplementationContext implements HandlerContext {
  readonly method: UnarySpec["method"];
  readonly service: HandlerContext["service"];
  readonly timeoutMs: () => number | undefined;
  readonly requestMethod: string;
  readonly protocolName: string;
  readonly values: HandlerContext["values"];
  readonly url: string;
  readonly abort: (reason?: unknown) => void;
  #call: UnaryCall;
  #request: InterceptedRequest;

  constructor(call: UnaryCall, req: InterceptedRequest) {
    this.#call = call;
    this.#request = req;
    this.method = call.method;
    this.service = req.service;
    this.timeoutMs = call.timeoutMs;
    this.requestMethod = call.requestMethod;
    this.protocolName = call.protocolName;
    this.values = req.contextValues;
    this.url = call.url;
    this.abort = call.abort;
  }

  get requestHeader(): Headers {
    return (this.#request.header as Headers | undefined) ?? this.#call.requestHeader;
  }

  get responseHeader(): Headers {
    return this.#call.responseHeader;
  }

  get responseTrailer(): Headers {
    return this.#call.responseTrailer;
  }

  get signal(): AbortSignal {
    return (this.#request.signal as AbortSignal | undefined) ?? this.#call.signal;
  }
}

/** Replace the headers of `to` with those of `from` (nothing to do when they are the same object). */
function copyHeaders(from: Headers, to: Headers): void {
  if (from === to) return;
  for (const key of [...to.keys()]) to.delete(key);
  from.forEach((value, key) => {
    to.set(key, value);
  });
}

/**
 * The lookup with request parsing whose failures are the client's: Connect reports a
 * malformed binary message as Internal ("parse binary: …", while malformed JSON is
 * InvalidArgument), so a client sending garbage was answered with a server fault. Request
 * bytes that do not parse are InvalidArgument, with Connect's message; serializing the
 * response is untouched (a failure there is ours).
 */
function clientFaultParsing(lookup: Lookup): Lookup {
  const wrap = (s: Serialization<MessageShape<DescMessage>>): Serialization<MessageShape<DescMessage>> => ({
    serialize: s.serialize,
    parse(data) {
      try {
        return s.parse(data);
      } catch (e) {
        if (e instanceof ConnectError && e.code === Code.Internal)
          throw new ConnectError(e.rawMessage, Code.InvalidArgument, undefined, undefined, e);
        throw e;
      }
    },
  });
  const binary = wrap(lookup.getI(true));
  const json = wrap(lookup.getI(false));
  return { getI: (useBinary) => (useBinary ? binary : json), getO: lookup.getO };
}

/** The error to answer a failed call with: `error`, or what the options' `callError` makes of it. */
function callError(
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
function asConnectError(e: unknown): ConnectError {
  return e instanceof ConnectError
    ? e
    : new ConnectError("internal error", Code.Internal, undefined, undefined, e);
}

/**
 * The single message of an enveloped request body. Errors, and their order, are those of
 * Connect's pipeline for a unary call (split, decompress and parse each envelope, then
 * expect exactly one message): a message over `readMaxBytes` as soon as its length is
 * known, a parse error of an extra message before "received extra input message", an
 * incomplete envelope when the body ends. Envelopes flagged `skipFlag` (gRPC-Web
 * trailers) are skipped, as Connect skips them. On an error the rest of the body is
 * left unread.
 */
async function readOneEnvelopedMessage<T>(
  body: AsyncIterable<Uint8Array>,
  readMaxBytes: number,
  compression: Compression | null,
  parser: Serialization<T>,
  skipFlag: number | undefined,
): Promise<T> {
  const it = body[Symbol.asyncIterator]();
  let pending: Uint8Array = EMPTY;
  let found = false;
  let input: T | undefined;
  let finished = false;
  try {
    for (let r = await it.next(); r.done !== true; r = await it.next()) {
      pending = pending.byteLength === 0 ? r.value : concat(pending, r.value);
      while (pending.byteLength >= 5) {
        const length = new DataView(pending.buffer, pending.byteOffset + 1, 4).getUint32(0);
        if (length > readMaxBytes) {
          throw new ConnectError(
            `message size ${length} is larger than configured readMaxBytes ${readMaxBytes}`,
            Code.ResourceExhausted,
          );
        }
        if (pending.byteLength < 5 + length) break;
        const flags = pending[0]!;
        // A copy, as Connect's envelope decoder makes: parsed bytes fields may keep views of it.
        const data = pending.slice(5, 5 + length);
        pending = pending.subarray(5 + length);
        const env = await envelopeDecompress({ flags, data }, compression, readMaxBytes);
        if (skipFlag !== undefined && (env.flags & skipFlag) === skipFlag) continue;
        const parsed = parser.parse(env.data);
        if (found) {
          throw new ConnectError(
            "protocol error: received extra input message for unary method",
            Code.Unimplemented,
          );
        }
        found = true;
        input = parsed;
      }
    }
    finished = true;
  } finally {
    // Stop reading: the adapter's body discards what is left.
    if (!finished) it.return?.().catch(() => undefined);
  }
  if (pending.byteLength > 0)
    throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
  if (!found)
    throw new ConnectError("protocol error: missing input message for unary method", Code.Unimplemented);
  return input as T;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength);
  out.set(a, 0);
  out.set(b, a.byteLength);
  return out;
}
