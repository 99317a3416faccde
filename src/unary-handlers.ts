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
 * What is hand-written is only the control flow of a unary call, the same for every
 * protocol: read one message, invoke, write one message. Every protocol detail is
 * Connect's own exported code, called as its handlers call it: content types, timeouts,
 * compression negotiation, envelopes, (de)serialization with its size limits, the
 * handler context, the interceptor chain and implementation call
 * (`invokeUnaryImplementation`), error JSON, HTTP status mapping, gRPC trailers. Error
 * messages and codes are those of Connect's handlers, and test/unary-handlers.test.ts
 * compares the two byte for byte, over every protocol, for successes and for each kind
 * of failure. Streaming calls, Connect GET and gRPC-Web text stay with Connect.
 */
import {
  Code,
  ConnectError,
  createContextValues,
  type HandlerContext,
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
  invokeUnaryImplementation,
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

/** A request whose body is a byte stream (what the Node adapter hands over). */
export type UnaryRequest = UniversalServerRequest & { body: AsyncIterable<Uint8Array> };

/** The whole answer to a unary call: status, headers, the body in one piece, and HTTP trailers (gRPC only). */
export interface UnaryAnswer {
  status: number;
  header: Headers;
  body: Uint8Array;
  trailer?: Headers;
}

export type UnaryHandler = (req: UnaryRequest) => Promise<UnaryAnswer>;

type HandlerOptions = ReturnType<typeof validateUniversalHandlerOptions>;
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
  options: Partial<UniversalHandlerOptions> & { connect?: boolean; grpc?: boolean; grpcWeb?: boolean },
  spec: UnarySpec,
): Partial<Record<UnaryProtocol, UnaryHandler>> {
  const opt = validateUniversalHandlerOptions(options);
  const serialization = createMethodSerializationLookup(spec.method, opt.binaryOptions, opt.jsonOptions, opt);
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
    const type = connect.parseContentType(req.header.get(connect.headerContentType));
    const binary = type?.binary === true;
    const timeout = connect.parseTimeout(req.header.get(connect.headerTimeout), opt.maxTimeoutMs);
    const context = unaryContext(spec, req, "connect", timeout.timeoutMs, opt.shutdownSignal);
    context.responseHeader.set(
      connect.headerContentType,
      binary ? connect.contentTypeUnaryProto : connect.contentTypeUnaryJson,
    );
    const compression = compressionNegotiate(
      opt.acceptCompression,
      req.header.get(connect.headerUnaryEncoding),
      req.header.get(connect.headerUnaryAcceptEncoding),
      connect.headerUnaryAcceptEncoding,
    );
    let status = 200;
    let body: Uint8Array;
    try {
      if (compression.error) throw compression.error;
      if (timeout.error) throw timeout.error;
      let bytes = await readAllBytes(
        req.body,
        opt.readMaxBytes,
        req.header.get(connect.headerUnaryContentLength),
      );
      if (compression.request) bytes = await compression.request.decompress(bytes, opt.readMaxBytes);
      const input = serialization.getI(binary).parse(bytes);
      const output = await invokeUnaryImplementation(spec, context, input, opt.interceptors);
      body = serialization.getO(binary).serialize(output);
    } catch (e) {
      context.abort(e);
      const error = asConnectError(e);
      status = connect.codeToHttpStatus(error.code);
      context.responseHeader.set(connect.headerContentType, connect.contentTypeUnaryJson);
      error.metadata.forEach((value, key) => {
        context.responseHeader.set(key, value);
      });
      body = connect.errorToJsonBytes(error, opt.jsonOptions ?? {});
    } finally {
      context.abort(CALL_DONE);
    }
    if (compression.response && body.byteLength >= opt.compressMinBytes) {
      body = await compression.response.compress(body);
      context.responseHeader.set(connect.headerUnaryEncoding, compression.response.name);
    }
    const header = connect.trailerMux(context.responseHeader, context.responseTrailer);
    header.set(connect.headerUnaryContentLength, body.byteLength.toString(10));
    return { status, header, body };
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
    const binary = types.parseContentType(req.header.get(grpc.headerContentType))?.binary !== false;
    const timeout = grpc.parseTimeout(req.header.get(grpc.headerTimeout), opt.maxTimeoutMs);
    const context = unaryContext(spec, req, protocolName, timeout.timeoutMs, opt.shutdownSignal);
    context.responseHeader.set(
      grpc.headerContentType,
      binary ? types.contentTypeProto : types.contentTypeJson,
    );
    context.responseTrailer.set(grpc.headerGrpcStatus, grpc.grpcStatusOk);
    const compression = compressionNegotiate(
      opt.acceptCompression,
      req.header.get(grpc.headerEncoding),
      req.header.get(grpc.headerAcceptEncoding),
      grpc.headerAcceptEncoding,
    );
    if (compression.response) context.responseHeader.set(grpc.headerEncoding, compression.response.name);
    let message: Uint8Array | undefined;
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
      const output = await invokeUnaryImplementation(spec, context, input, opt.interceptors);
      const env = await envelopeCompress(
        { flags: 0, data: serialization.getO(binary).serialize(output) },
        compression.response,
        opt.compressMinBytes,
      );
      message = encodeEnvelope(env.flags, env.data);
      context.abort(CALL_DONE);
    } catch (e) {
      context.abort(e);
      grpc.setTrailerStatus(context.responseTrailer, asConnectError(e));
    }
    if (!web)
      return {
        status: 200,
        header: context.responseHeader,
        body: message ?? EMPTY,
        trailer: context.responseTrailer,
      };
    const trailer = await envelopeCompress(
      { flags: grpcWeb.trailerFlag, data: grpcWeb.trailerSerialize(context.responseTrailer) },
      compression.response,
      opt.compressMinBytes,
    );
    const frame = encodeEnvelope(trailer.flags, trailer.data);
    return { status: 200, header: context.responseHeader, body: message ? concat(message, frame) : frame };
  };
}

const EMPTY = new Uint8Array(0);

/** A handler context, and how the call ends it (as Connect's `HandlerContextController`). */
type UnaryContext = HandlerContext & { abort(reason?: unknown): void };

/**
 * The handler context of a unary call: what Connect's `createHandlerContext` gives the
 * interceptors and the implementation (the same members, and a real AbortSignal that
 * aborts when the client goes away, when the deadline passes, on shutdown, and when
 * the call ends), built with less. Connect's makes two AbortControllers per call (one
 * for a deadline even when there is none) linked by listeners on both, and copies the
 * request headers; in profiles that was a tenth of a unary call. Here: one
 * AbortController, a timer only for a deadline, the request's Headers as they are (the
 * adapter makes them for this call alone), and the request signal linked through the
 * adapter's plain-object signal.
 */
function unaryContext(
  spec: UnarySpec,
  req: UnaryRequest,
  protocolName: UnaryProtocol,
  timeoutMs: number | undefined,
  shutdownSignal: AbortSignal | undefined,
): UnaryContext {
  const controller = new AbortController();
  const linked = [req.signal, shutdownSignal];
  let timer: ReturnType<typeof setTimeout> | undefined;
  function onAbort(this: AbortSignal) {
    abort(getAbortSignalReason(this));
  }
  function abort(reason?: unknown) {
    if (timer !== undefined) clearTimeout(timer);
    for (const s of linked) s?.removeEventListener("abort", onAbort);
    if (!controller.signal.aborted) controller.abort(reason);
  }
  let deadline: number | undefined;
  if (timeoutMs !== undefined) {
    deadline = Date.now() + timeoutMs;
    const expire = () => abort(new ConnectError("the operation timed out", Code.DeadlineExceeded));
    if (timeoutMs <= 0) expire();
    else timer = setTimeout(expire, timeoutMs);
  }
  for (const s of linked) {
    if (s === undefined || controller.signal.aborted) continue;
    if (s.aborted) onAbort.call(s);
    else s.addEventListener("abort", onAbort);
  }
  return {
    method: spec.method,
    service: spec.method.parent,
    signal: controller.signal,
    timeoutMs: () => (deadline === undefined ? undefined : deadline - Date.now()),
    requestMethod: req.method,
    requestHeader: req.header,
    responseHeader: new Headers(),
    responseTrailer: new Headers(),
    protocolName,
    values: req.contextValues ?? createContextValues(),
    url: req.url,
    abort,
  };
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
