import type * as http from "node:http";
import type * as http2 from "node:http2";
import { constants as http2constants } from "node:http2";
import type { Readable } from "node:stream";
import type { DescMethod } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  type ConnectRouterOptions,
  type ContextValues,
  createConnectRouter,
  createMethodImplSpec,
  createServiceImplSpec,
  type MethodImplSpec,
} from "@connectrpc/connect";
import {
  type Compression,
  createMethodUrl,
  encodeEnvelope,
  type UniversalHandler,
  type UniversalServerResponse,
} from "@connectrpc/connect/protocol";
import {
  codeFromHttpStatus,
  codeFromString,
  codeToHttpStatus,
  contentTypeUnaryJson as connectJson,
  contentTypeUnaryRegExp as connectUnaryType,
  errorToJsonBytes,
} from "@connectrpc/connect/protocol-connect";
import {
  contentTypeJson as grpcJson,
  contentTypeProto as grpcProto,
  contentTypeRegExp as grpcType,
  setTrailerStatus,
} from "@connectrpc/connect/protocol-grpc";
import {
  contentTypeJson as grpcWebJson,
  contentTypeProto as grpcWebProto,
  contentTypeRegExp as grpcWebType,
  trailerFlag,
  trailerSerialize,
} from "@connectrpc/connect/protocol-grpc-web";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { loggableError } from "./storage/errors.js";
import {
  type CallErrorHook,
  createUnaryHandlers,
  nodeHeaders,
  type UnaryAnswer,
  type UnaryHandler,
  type UnaryProtocol,
  type UnaryRequest,
} from "./unary-handlers.js";

/** A request as the adapter and its options' callbacks see it. */
export type NodeRequest = http.IncomingMessage | http2.Http2ServerRequest | StreamRequest;
type NodeResponse = http.ServerResponse | http2.Http2ServerResponse;

/**
 * A request listener for Node's HTTP servers that can also serve some HTTP/2 streams
 * straight from the server's "stream" event: `stream` returns false, having done nothing,
 * for a stream it leaves to the compatibility layer (see {@link serveRequests}).
 */
export interface StreamingHandler {
  (req: http.IncomingMessage | http2.Http2ServerRequest, res: NodeResponse): void;
  stream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): boolean;
}

/**
 * What {@link createConnectHandler} returns: a request listener whose `stream` serves
 * the HTTP/2 streams the unary handlers answer, as a StreamRequest without a response
 * object. `prepare`, when given, runs on that request before anything else (server.ts
 * attaches its request state there).
 */
export interface ConnectHandler extends StreamingHandler {
  stream(
    stream: http2.ServerHttp2Stream,
    headers: http2.IncomingHttpHeaders,
    prepare?: (req: StreamRequest) => void,
  ): boolean;
  /** The RPC a request path (query string allowed) names, or undefined when none does. */
  methodOf(url: string | undefined): DescMethod | undefined;
}

/**
 * An HTTP/2 request served from its stream alone, without the request and response
 * objects of Node's compatibility layer: it has the members of `Http2ServerRequest` that
 * the adapter and the callbacks of its options read. Only unary POSTs the unary handlers
 * answer are served so (see {@link serveRequests} for why).
 */
export class StreamRequest {
  readonly httpVersion = "2.0";

  constructor(
    readonly stream: http2.ServerHttp2Stream,
    readonly headers: http2.IncomingHttpHeaders,
  ) {
    // An "error" without a listener would be thrown; the compatibility layer ignores them too.
    stream.on("error", ignoreStreamError);
  }

  get method(): string {
    return this.headers[":method"] ?? "";
  }

  get url(): string {
    return this.headers[":path"] ?? "";
  }

  get scheme(): string {
    return this.headers[":scheme"] ?? "";
  }

  get authority(): string | undefined {
    return this.headers[":authority"] ?? this.headers.host;
  }

  /** The connection's socket (a proxy Node makes once per session), as `Http2ServerRequest.socket` gives it. */
  get socket(): import("node:net").Socket {
    return this.stream.session!.socket as import("node:net").Socket;
  }
}

/**
 * Serve `handler` on `server`: HTTP/1.1 requests and most HTTP/2 streams through Node's
 * "request" event and its compatibility layer, as `server.on("request", handler)` would;
 * HTTP/2 streams that `handler.stream` takes (unary calls) without it.
 *
 * Why: profiled under load, the compatibility layer's request and response objects (a
 * Readable and a Stream, a dozen stream listeners, their events) were about a tenth of
 * an authenticated unary call, for objects such a call does not need: it reads one small
 * body and writes one answer, straight onto the stream (see writeUnaryAnswer). Node's own
 * "stream" listener of the compatibility layer (installed when the first "request"
 * listener is added) is kept and called for every stream `handler.stream` leaves, so
 * everything else (streaming RPCs, Connect GET, CORS preflights, the plain endpoints,
 * CONNECT and `Expect` handling) is served exactly as before.
 */
export function serveRequests(
  server: http2.Http2Server | http2.Http2SecureServer,
  handler: StreamingHandler,
): void {
  const before = server.listeners("stream");
  server.on("request", handler);
  const compat = server.listeners("stream").filter((l) => !before.includes(l));
  if (compat.length !== 1)
    throw new Error("node:http2 did not install its compatibility layer's stream listener");
  const onCompatStream = compat[0] as (...args: unknown[]) => void;
  server.off("stream", onCompatStream);
  server.on(
    "stream",
    function onStream(
      this: unknown,
      stream: http2.ServerHttp2Stream,
      headers: http2.IncomingHttpHeaders,
      flags: number,
      rawHeaders: string[],
    ) {
      if (!handler.stream(stream, headers)) onCompatStream.call(this, stream, headers, flags, rawHeaders);
    },
  );
}

/** For the streams served without the compatibility layer, whose own "error" listener swallows stream errors. */
function ignoreStreamError(): void {}

function ignoreChunk(): void {}

/** Options of {@link createConnectHandler}: those of `connectNodeAdapter`. */
export interface ConnectHandlerOptions extends ConnectRouterOptions {
  routes(router: ConnectRouter): void;
  contextValues?: (req: NodeRequest) => ContextValues;
  /** Requests for paths no RPC serves (default: 404). */
  fallback?: (req: NodeRequest, res: NodeResponse) => void;
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
   * past `readMaxBytes` is stopped. `early` tells whether this request can
   * be answered so: a unary call by POST over Connect, gRPC or gRPC-Web. When it is false,
   * an error returned is ignored and the request goes on into Connect, so a refusal must be
   * left to the pipeline then. A synchronous result costs no promise. A {@link WireError}
   * answers as a ConnectError would, from the wire form it gives.
   */
  admit?: (req: NodeRequest, method: DescMethod, early: boolean) => Verdict | Promise<Verdict>;
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

/** What `admit` decides: go on (undefined), or answer with an error. */
type Verdict = ConnectError | WireError | undefined;

/**
 * An error `admit` answers a call with, already in wire form: what Connect would write for
 * it, made by the caller without a ConnectError (e.g. cheaper, or with parts made once).
 */
export interface WireError {
  readonly code: Code;
  /** The Connect protocol's answer: its headers (a new object) and its JSON body, final (`errorBody` is not applied to it). */
  connect(): { header: http.OutgoingHttpHeaders; body: Uint8Array };
  /** The gRPC status trailers (a new object): the error's metadata, grpc-status, grpc-message, grpc-status-details-bin. */
  grpcTrailers(): http.OutgoingHttpHeaders;
}

/**
 * A Node request listener serving a Connect router: a drop-in for connect-node's
 * `connectNodeAdapter` (same router, same protocol handlers, same options), with a
 * leaner bridge between Node's request/response and Connect's universal handlers.
 *
 * Why: profiled under load, the stock adapter spent about a fifth of the CPU of a unary
 * call outside the RPC: it aborts an AbortController on every request, even a
 * successful one (each abort builds a DOMException with a captured stack trace), reads
 * the body through the stream's generic async iterator, and writes each chunk through a
 * promise with two event listeners before awaiting an "end" event. Here:
 * - the request signal aborts only when the client goes away before the response is
 *   complete (an HTTP/2 reset or a closed connection), with the same reasons connect-node
 *   gives (Canceled, Unavailable, …), so handlers still see cancellation;
 * - the body is handed over as the chunks arrive through a small queue (backpressure by
 *   pausing the request), still enforcing `readMaxBytes` in Connect's own reader;
 * - the response is written directly, waiting for "drain" only when Node asks for it;
 * - unary calls over Connect (POST), gRPC and gRPC-Web go to the handlers of
 *   unary-handlers.ts, which answer as Connect's do without its streaming pipeline.
 * Every protocol detail (content types, compression, timeouts, envelopes, errors) is
 * @connectrpc/connect's own code; streams, Connect GET and gRPC-Web text are served by
 * Connect's handlers, untouched.
 */
export function createConnectHandler(options: ConnectHandlerOptions): ConnectHandler {
  if (options.acceptCompression === undefined)
    options.acceptCompression = [
      clientFaultDecompression(compressionGzip),
      clientFaultDecompression(compressionBrotli),
    ];
  const router = createConnectRouter(options);
  const logger = options.logger;
  // Unary methods also get the pipeline-free handlers of unary-handlers.ts, for the
  // protocols they serve; methods registered with options of their own stay with Connect.
  const unary = new Map<string, Partial<Record<UnaryProtocol, UnaryHandler>>>();
  const addUnary = (spec: MethodImplSpec) => {
    if (spec.kind === "unary")
      unary.set(createMethodUrl("/", spec.method), createUnaryHandlers(options, spec));
  };
  const recorder: ConnectRouter = {
    handlers: router.handlers,
    service(service, implementation, serviceOptions) {
      router.service(service, implementation, serviceOptions);
      if (serviceOptions === undefined)
        for (const spec of Object.values(createServiceImplSpec(service, implementation).methods))
          addUnary(spec);
      return this;
    },
    rpc(method, implementation, rpcOptions) {
      router.rpc(method, implementation, rpcOptions);
      if (rpcOptions === undefined) addUnary(createMethodImplSpec(method, implementation));
      return this;
    },
  };
  options.routes(recorder);
  const paths = new Map<string, Route>();
  for (const handler of router.handlers)
    paths.set(handler.requestPath, { handler, unary: unary.get(handler.requestPath) });
  const fallback = options.fallback ?? notFound;
  const errorBody = options.errorBody;
  const admit = options.admit;
  const readMaxBytes = options.readMaxBytes ?? 0xffffffff;
  const maxBodyBytes = options.maxBodyBytes ?? Number.POSITIVE_INFINITY;
  const responseHeaders = options.responseHeaders;
  const onCallEnd = options.onCallEnd;

  /** The route of an HTTP/2 request the unary handlers answer (and so can be served as a StreamRequest), else undefined. */
  function acceptedRoute(headers: http2.IncomingHttpHeaders): Route | undefined {
    if (headers[":method"] !== "POST" || headers.expect !== undefined) return undefined;
    const protocol = earlyProtocol("POST", headers["content-type"]);
    if (protocol === undefined) return undefined;
    const route = routeOf(headers[":path"]);
    return route?.unary?.[protocol.kind] === undefined ? undefined : route;
  }

  function routeOf(url: string | undefined): Route | undefined {
    if (url === undefined) return undefined;
    const q = url.indexOf("?");
    return paths.get(q < 0 ? url : url.slice(0, q));
  }

  /**
   * Serve `req`. A StreamRequest comes without a response object (`res` undefined) and
   * with its route, one `acceptedRoute` gave, so it takes the unary handlers' path, which
   * writes onto the stream.
   */
  function handleConnect(
    req: NodeRequest,
    res: NodeResponse | undefined,
    route: Route | undefined = routeOf(req.url),
  ): void {
    const common = responseHeaders?.(req);
    if (!route) {
      setHeaders(res!, common);
      fallback(req, res!);
      return;
    }
    const { handler } = route;
    const protocol =
      handler.method.methodKind === "unary"
        ? earlyProtocol(req.method, req.headers["content-type"])
        : undefined;
    if (admit === undefined) {
      dispatch(route, protocol, req, res, common);
      return;
    }
    let verdict: ReturnType<typeof admit>;
    try {
      verdict = admit(req, handler.method, protocol !== undefined);
    } catch (err) {
      verdict = admitFailed(handler, err, logger);
    }
    if (verdict === undefined) dispatch(route, protocol, req, res, common);
    else if (!isPromise(verdict)) answer(verdict);
    else
      verdict.then(
        (error) => (error === undefined ? dispatch(route, protocol, req, res, common) : answer(error)),
        (err: unknown) => answer(admitFailed(handler, err, logger)),
      );

    function answer(error: ConnectError | WireError) {
      if (protocol === undefined) dispatch(route!, protocol, req, res, common);
      else {
        discardBody(req, res, readMaxBytes);
        if (gone(req)) {
          onCallEnd?.(req, handler.method, protocol.kind, Code.Canceled);
          return;
        }
        let early: UnaryAnswer;
        try {
          early = earlyAnswer(protocol, error, options.jsonOptions);
        } catch {
          destroy(req, res);
          onCallEnd?.(req, handler.method, protocol.kind, Code.Internal);
          return;
        }
        writeUnaryAnswer(early, req, res, errorBody, common);
        onCallEnd?.(req, handler.method, protocol.kind, early.code);
      }
    }
  }

  const serve = handleConnect as ConnectHandler;
  serve.methodOf = (url) => routeOf(url)?.handler.method;
  serve.stream = (stream, headers, prepare) => {
    const route = acceptedRoute(headers);
    if (route === undefined) return false;
    const req = new StreamRequest(stream, headers);
    prepare?.(req);
    handleConnect(req, undefined, route);
    return true;
  };
  return serve;

  function dispatch(
    route: Route,
    protocol: EarlyProtocol | undefined,
    req: NodeRequest,
    res: NodeResponse | undefined,
    common: http.OutgoingHttpHeaders | undefined,
  ): void {
    const { handler } = route;
    // Gone while admission was pending: nothing to answer.
    if (gone(req)) {
      onCallEnd?.(req, handler.method, protocol?.kind ?? protocolOf(req), Code.Canceled);
      return;
    }
    const url = req.url ?? "";
    const signal = new RequestSignal();
    // Whether the answer was written (through `res`, or by writeUnaryAnswer on the HTTP/2 stream).
    let answered = false;
    const onClose = () => {
      // Closed before the response was ended: the client went away (an HTTP/2 reset, a
      // dropped connection). A response ended by us closes normally and aborts nothing.
      if (!answered && !res?.writableEnded) signal.abort(closeReason(req));
    };
    // A StreamRequest's stream closes when the compatibility layer's response would.
    (res ?? (req as StreamRequest).stream).on("close", onClose);
    // HTTP/2 carries the scheme (req.socket would build a Proxy per stream); HTTP/1.1 has the socket.
    const encrypted =
      "scheme" in req ? req.scheme === "https" : "encrypted" in req.socket && req.socket.encrypted;
    const authority = "authority" in req ? req.authority : req.headers.host;
    const uReq = new AdapterRequest(
      req.httpVersion,
      req.method ?? "",
      `${encrypted ? "https" : "http"}://${authority ?? "localhost"}${url}`,
      req.headers,
      // A StreamRequest's stream has an "error" listener of its own: an error destroys the
      // stream, and its "close" before "end" tells the body reader the client went away.
      bodyOf(readableOf(req), !(req instanceof StreamRequest), maxBodyBytes),
      signal as unknown as AbortSignal,
      options.contextValues?.(req),
    );
    const onError = (err: unknown) => {
      onCallEnd?.(req, handler.method, protocol?.kind ?? protocolOf(req), Code.Internal);
      if (ConnectError.from(err).code !== Code.Aborted && ConnectError.from(err).code !== Code.Canceled) {
        logger?.error(
          { method: `${handler.service.typeName}/${handler.method.name}`, err: loggableError(err) },
          "rpc handler failed",
        );
      }
      if (res === undefined) {
        const { stream } = req as StreamRequest;
        // `respond` throws on a stream already closed (reset by the client): nothing to answer then.
        if (stream.headersSent || stream.closed || stream.destroyed) stream.destroy();
        else stream.respond({ ...common, ":status": 500 }, { endStream: true });
      } else if (!res.headersSent) {
        setHeaders(res, common);
        res.statusCode = 500;
        res.end();
      } else {
        res.destroy();
      }
    };
    const unaryHandler = protocol && route.unary?.[protocol.kind];
    if (unaryHandler) {
      unaryHandler(uReq).then((answer) => {
        answered = true;
        const code = gone(req) ? Code.Canceled : answer.code;
        writeUnaryAnswer(answer, req, res, errorBody, common);
        onCallEnd?.(req, handler.method, protocol.kind, code);
        // Answered before the body's end (refused while the client was still uploading).
        stopUnreadBody(req, res, readMaxBytes);
      }, onError);
      return;
    }
    if (res === undefined) throw new Error("a StreamRequest the unary handlers do not serve");
    setHeaders(res, common);
    handler(uReq)
      .then(
        (uRes) =>
          (uRes.status >= 400 && errorBody
            ? writeErrorResponse(uRes, req, res, errorBody)
            : writeResponse(uRes, res)
          ).then((code) => onCallEnd?.(req, handler.method, protocolOf(req), code)),
        onError,
      )
      .then(() => stopUnreadBody(req, res, readMaxBytes));
  }
}

/**
 * The request as Connect's handlers and the unary handlers see it. Its `header` (fetch
 * Headers) is made from Node's headers when first read: the unary handlers read what they
 * need from `nodeHeaders`, so a call whose interceptors and implementation never read
 * `header` never makes it (see `UnaryRequest`).
 */
class AdapterRequest implements UnaryRequest {
  #header: Headers | undefined;

  constructor(
    readonly httpVersion: string,
    readonly method: string,
    readonly url: string,
    readonly nodeHeaders: http.IncomingHttpHeaders,
    readonly body: AsyncIterable<Uint8Array>,
    readonly signal: AbortSignal,
    readonly contextValues: ContextValues | undefined,
  ) {}

  get header(): Headers {
    if (this.#header === undefined) this.#header = webHeaders(this.nodeHeaders);
    return this.#header;
  }
}

/** An RPC path: Connect's handler for it, and the unary handlers by protocol when it has them. */
interface Route {
  handler: UniversalHandler;
  unary: Partial<Record<UnaryProtocol, UnaryHandler>> | undefined;
}

function isPromise(verdict: Verdict | Promise<Verdict>): verdict is Promise<Verdict> {
  return typeof (verdict as Partial<Promise<Verdict>>).then === "function";
}

/** A failure of `admit` itself: logged, and answered as Connect answers a handler's unexpected error. */
function admitFailed(
  handler: UniversalHandler,
  err: unknown,
  logger: Pick<Logger, "error"> | undefined,
): ConnectError {
  if (err instanceof ConnectError) return err;
  logger?.error(
    { method: `${handler.service.typeName}/${handler.method.name}`, err: loggableError(err) },
    "rpc admission failed",
  );
  return new ConnectError("internal error", Code.Internal, undefined, undefined, err);
}

/** The protocols of a unary POST this adapter answers itself: an early error (see `admit`), or the whole call (unary-handlers.ts). */
type EarlyProtocol = { kind: "connect" } | { kind: "grpc" | "grpc-web"; json: boolean };

/** The protocol of a unary POST this adapter can answer itself, or undefined (left to Connect's handlers). */
function earlyProtocol(method: string | undefined, type: string | undefined): EarlyProtocol | undefined {
  if (method !== "POST" || type === undefined) return undefined;
  if (connectUnaryType.test(type)) return { kind: "connect" };
  let m = grpcType.exec(type);
  if (m) return { kind: "grpc", json: m[1] !== undefined };
  m = grpcWebType.exec(type);
  // grpc-web-text (base64 framing) is left to Connect.
  if (m && m[1] === undefined) return { kind: "grpc-web", json: m[2] !== undefined };
  return undefined;
}

/**
 * `compression` with request bodies that do not decompress answered as the client's fault:
 * connect-node maps only some zlib errors to InvalidArgument, and a truncated gzip body
 * (Z_BUF_ERROR, "unexpected end of file") was Internal. Whatever fails to decompress is
 * what the client sent; compressing our answers is untouched. Used for every protocol,
 * on Connect's handlers and on the unary handlers alike (both take `acceptCompression`).
 */
function clientFaultDecompression(compression: Compression): Compression {
  return {
    name: compression.name,
    compress: compression.compress,
    decompress: (bytes, readMaxBytes) =>
      compression.decompress(bytes, readMaxBytes).catch((e: unknown) => {
        if (e instanceof ConnectError && e.code === Code.Internal)
          throw new ConnectError(e.rawMessage, Code.InvalidArgument, undefined, undefined, e);
        throw e;
      }),
  };
}

/** Set `headers` on the response (nothing when there are none). */
export function setHeaders(res: NodeResponse, headers: http.OutgoingHttpHeaders | undefined): void {
  if (headers === undefined) return;
  for (const k in headers) res.setHeader(k, headers[k]!);
}

function gone(req: NodeRequest): boolean {
  return "stream" in req ? req.stream.destroyed : req.socket.destroyed;
}

/** Where the request body is read from: a StreamRequest's stream, or the request object itself. */
function readableOf(req: NodeRequest): Readable {
  return req instanceof StreamRequest ? req.stream : req;
}

/** Drop the request's stream or response, after a failure to answer. */
function destroy(req: NodeRequest, res: NodeResponse | undefined): void {
  if (res === undefined) (req as StreamRequest).stream.destroy();
  else res.destroy();
}

/**
 * After a unary answer was written, a body that was not read to its end (the call was
 * refused before, or because of, what the client was still sending) is not left pending:
 * HTTP/2 resets the stream once the answer is out (RST_STREAM NO_ERROR, RFC 9113 §8.1),
 * HTTP/1.1 discards up to `limit` bytes and then closes the connection (see discardBody).
 */
function stopUnreadBody(req: NodeRequest, res: NodeResponse | undefined, limit: number): void {
  const source = readableOf(req);
  if (source.readableEnded || source.destroyed) return;
  if ("stream" in req) {
    resetWhenAnswered(req);
    return;
  }
  discardBody(req, res, limit);
  // bodyOf paused it when it stopped reading.
  source.resume();
}

/** HTTP/2: close the request's stream with NO_ERROR once the answer is out (what the client still sends is dropped). */
function resetWhenAnswered(req: NodeRequest & { stream: http2.Http2Stream }): void {
  const stream = req.stream as http2.ServerHttp2Stream;
  let waits = 0;
  // Closed once nghttp2 has sent the end of the answer (END_STREAM: `localClose`). An
  // RST_STREAM submitted before goes out first (nghttp2 sends it ahead of queued frames) and
  // the trailers, with the gRPC status, would be lost. Node writes on a native immediate, so
  // this waits an immediate at a time, a few at most (a client that reads nothing cannot
  // hold the stream open: it is closed anyway then).
  const stop = () => {
    if (stream.closed || stream.destroyed) return;
    if (stream.state.localClose !== 1 && waits++ < 8) setImmediate(stop);
    else stream.close(http2constants.NGHTTP2_NO_ERROR);
  };
  // Every answer asks for trailers (`waitForTrailers`, here and in the compatibility layer):
  // it ends once its "wantTrailers" listener has sent them.
  if (stream.sentTrailers !== undefined) stop();
  else stream.once("wantTrailers", () => setImmediate(stop));
}

/**
 * Discard the body of a request answered without reading it: HTTP/2 asks the client to
 * stop sending as soon as the answer is out (RST_STREAM NO_ERROR, RFC 9113 §8.1), so a
 * refused upload is not read at all; HTTP/1.1, which cannot refuse the rest of a request
 * and keep the connection, reads up to `limit` bytes (what Connect would have read) and
 * past that closes the connection, so a refused caller cannot keep the server reading.
 */
function discardBody(req: NodeRequest, res: NodeResponse | undefined, limit: number): void {
  const source = readableOf(req);
  if ("stream" in req && !source.readableEnded) {
    // Dropped as it comes until the reset: a paused stream would hold the client's window.
    source.on("data", ignoreChunk);
    resetWhenAnswered(req);
    return;
  }
  let seen = 0;
  const onData = (chunk: Buffer) => {
    seen += chunk.byteLength;
    if (seen <= limit) return;
    source.off("data", onData);
    const stop = () => {
      if ("stream" in req) req.stream.close(http2constants.NGHTTP2_NO_ERROR);
      else req.socket.destroy();
    };
    // HTTP/2: the stream's own "finish" (the compatibility layer's response emits one only
    // once the stream has closed, which a client still sending keeps from happening).
    const written = "stream" in req ? req.stream : res!;
    if (written.writableFinished) stop();
    else written.once("finish", stop);
  };
  source.on("data", onData);
}

/**
 * The answer to a refused call: `error` as Connect's handler for the protocol would
 * answer it (same status, headers, trailers and body; the body of a Connect error still
 * passes through `errorBody` in writeUnaryAnswer).
 */
function earlyAnswer(
  protocol: EarlyProtocol,
  error: ConnectError | WireError,
  jsonOptions: ConnectHandlerOptions["jsonOptions"],
): UnaryAnswer {
  const wire = error instanceof ConnectError ? undefined : error;
  if (protocol.kind === "connect") {
    const status = codeToHttpStatus(error.code);
    if (wire) return { status, ...wire.connect(), plain: false, final: true, code: error.code };
    const body = errorToJsonBytes(error as ConnectError, jsonOptions ?? {});
    const header = nodeHeaders((error as ConnectError).metadata);
    header["content-type"] = connectJson;
    header["content-length"] = body.byteLength;
    return { status, header, body, plain: false, code: error.code };
  }
  const trailer = wire
    ? wire.grpcTrailers()
    : nodeHeaders(setTrailerStatus(new Headers(), error as ConnectError));
  if (protocol.kind === "grpc") {
    return {
      status: 200,
      header: { "content-type": protocol.json ? grpcJson : grpcProto },
      body: new Uint8Array(0),
      trailer,
      plain: false,
      code: error.code,
    };
  }
  // gRPC-Web: the trailers travel in the body, as a trailer frame.
  return {
    status: 200,
    header: { "content-type": protocol.json ? grpcWebJson : grpcWebProto },
    body: encodeEnvelope(trailerFlag, trailerSerialize(new Headers(trailer as Record<string, string>))),
    plain: false,
    code: error.code,
  };
}

type AbortListener = (this: RequestSignal, event: Event) => void;

/**
 * The request's abort signal as Connect's protocol handlers use it: they only link it
 * into the handler context's own AbortController (createLinkedAbortController reads
 * `aborted` and `reason` and adds and removes one "abort" listener); handlers see that
 * controller's real AbortSignal, never this object.
 *
 * Why not an AbortController: a DOM AbortSignal is an EventTarget, and making one, adding
 * and removing a listener cost a few percent of a unary call in profiles, for a signal
 * that almost never fires. This one is a plain object with the same observable behaviour
 * for that use: it fires its listeners once, with an "abort" Event, when the client goes
 * away (test/connect-adapter.test.ts checks that handlers still see cancellation).
 */
class RequestSignal {
  aborted = false;
  reason: unknown = undefined;
  onabort: AbortListener | null = null;
  private listeners: AbortListener[] | undefined;

  addEventListener(type: string, listener: AbortListener): void {
    if (type !== "abort" || this.aborted) return;
    if (this.listeners) this.listeners.push(listener);
    else this.listeners = [listener];
  }

  removeEventListener(type: string, listener: AbortListener): void {
    if (type !== "abort" || !this.listeners) return;
    const i = this.listeners.indexOf(listener);
    if (i >= 0) this.listeners.splice(i, 1);
  }

  throwIfAborted(): void {
    if (this.aborted) throw this.reason;
  }

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    const listeners = this.listeners ?? [];
    this.listeners = undefined;
    const event = new Event("abort");
    for (const listener of listeners) listener.call(this, event);
    this.onabort?.call(this, event);
  }
}

function notFound(_req: NodeRequest, res: NodeResponse): void {
  res.statusCode = 404;
  res.end();
}

/** Why the request ended early, as connect-node reports it. */
function closeReason(req: NodeRequest): ConnectError {
  const rstCode = "stream" in req ? req.stream.rstCode : undefined;
  switch (rstCode) {
    case undefined:
    case 0x0: // NO_ERROR
    case 0x8: // CANCEL
      return new ConnectError("the client closed the request", Code.Canceled);
    case 0xb: // ENHANCE_YOUR_CALM
      return new ConnectError("http/2 stream closed with ENHANCE_YOUR_CALM", Code.ResourceExhausted);
    case 0xc: // INADEQUATE_SECURITY
      return new ConnectError("http/2 stream closed with INADEQUATE_SECURITY", Code.PermissionDenied);
    case 0x7: // REFUSED_STREAM
      return new ConnectError("http/2 stream closed with REFUSED_STREAM", Code.Unavailable);
    default:
      return new ConnectError(
        `http/2 stream closed with error code 0x${rstCode.toString(16)}`,
        Code.Internal,
      );
  }
}

/** Node's incoming headers as fetch Headers, without HTTP/2 pseudo-headers. */
function webHeaders(nodeHeaders: http.IncomingHttpHeaders): Headers {
  const header = new Headers();
  for (const k in nodeHeaders) {
    if (k.charCodeAt(0) === 58 /* ":" */) continue;
    const v = nodeHeaders[k];
    if (v === undefined) continue;
    if (typeof v === "string") header.append(k, v);
    else for (const e of v) header.append(k, e);
  }
  return header;
}

/** Optional fetch Headers as a Node header object. */
function nodeHeadersOf(header: Headers | undefined): http.OutgoingHttpHeaders | undefined {
  return header === undefined ? undefined : nodeHeaders(header);
}

/**
 * The request body as an async iterable fed by "data" events: one promise per chunk
 * the consumer waits for, none for chunks already queued. The request is paused while
 * more than a few chunks wait, so a slow consumer applies backpressure.
 */
function bodyOf(req: Readable, errors: boolean, maxBytes: number): AsyncIterable<Uint8Array> {
  const queue: Uint8Array[] = [];
  let received = 0;
  // Set once the body is no longer read (too large, or the handler stopped): what still
  // arrives is dropped, and the request stays paused for the adapter to stop (stopUnreadBody).
  // Not an HTTP/2 one: a paused stream with data pending pauses its whole session's reads,
  // so the connection was held (and counted against its address) even after the client
  // left; it flows, dropped, until the adapter resets it.
  let stopped = false;
  const http2 = "session" in req || "stream" in req;
  // A StreamRequest's stream whose empty last DATA frame arrived while admission was
  // pending has emitted "end" already, read by nobody (Node reads an HTTP/2 stream that
  // ended with no data to its end at once). "end" comes only once the buffer is empty,
  // so no data went unseen.
  let ended = req.readableEnded;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  req.on("data", (chunk: Buffer) => {
    if (stopped) return;
    received += chunk.byteLength;
    if (received > maxBytes) {
      stopped = true;
      queue.length = 0;
      if (!http2) req.pause();
      failure ??= new ConnectError(`request body larger than ${maxBytes} bytes`, Code.ResourceExhausted);
      notify();
      return;
    }
    queue.push(chunk);
    if (queue.length > 8) req.pause();
    notify();
  });
  // "on", not "once": each fires once, and "once" wraps every listener in one more closure.
  req.on("end", () => {
    ended = true;
    notify();
  });
  if (errors)
    req.on("error", (err) => {
      failure = err;
      notify();
    });
  req.on("close", () => {
    // Closed before its end: the client went away mid-body.
    if (!ended && failure === undefined) {
      failure = new ConnectError("the client closed the request", Code.Canceled);
      notify();
    }
  });
  return {
    [Symbol.asyncIterator]() {
      return {
        async next(): Promise<IteratorResult<Uint8Array>> {
          for (;;) {
            if (stopped && failure !== undefined) throw failure;
            const chunk = queue.shift();
            if (chunk !== undefined) {
              if (queue.length === 0 && req.isPaused()) req.resume();
              return { done: false, value: chunk };
            }
            if (failure !== undefined) throw failure;
            if (ended) return { done: true, value: undefined };
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
          }
        },
        async return(): Promise<IteratorResult<Uint8Array>> {
          // The handler stopped reading: the rest of the body is not read (stopUnreadBody).
          stopped = true;
          queue.length = 0;
          if (!ended) req.pause();
          return { done: true, value: undefined };
        },
      };
    },
  };
}

/**
 * Write a universal response: headers after the first body chunk (so handlers can still set
 * them), trailers last. Resolves to the code the call ended with (see {@link streamedCode}),
 * Canceled when the response could not be written to its end.
 */
async function writeResponse(uRes: UniversalServerResponse, res: NodeResponse): Promise<number> {
  const it = uRes.body?.[Symbol.asyncIterator]();
  // The members used here have the same shape on HTTP/1.1's and HTTP/2's response.
  const out = res as http2.Http2ServerResponse;
  let writing = false;
  let done = it === undefined;
  let last: Uint8Array | undefined;
  try {
    if (it !== undefined) {
      let chunk = await it.next();
      writing = true;
      out.writeHead(uRes.status, nodeHeadersOf(uRes.header));
      for (; chunk.done !== true; chunk = await it.next()) {
        writing = true;
        last = chunk.value;
        if (!out.write(chunk.value)) await drained(res);
        writing = false;
      }
      done = true;
    }
    if (!out.headersSent) out.writeHead(uRes.status, nodeHeadersOf(uRes.header));
    const trailers = nodeHeadersOf(uRes.trailer);
    if (trailers) out.addTrailers(trailers);
    out.end();
    return streamedCode(uRes, last);
  } catch (err) {
    // Report write errors to the handler (it stops producing); then drop the response.
    if (writing) it?.throw?.(err).catch(() => undefined);
    res.destroy();
    return Code.Canceled;
  } finally {
    // Only a body left unfinished needs return() (an exhausted iterator has nothing to
    // release; Connect's gRPC pipeline would abort its context a second time).
    if (!done) it?.return?.().catch(() => undefined);
  }
}

/**
 * Write a unary answer in one go; an error body (status ≥ 400) passes through `rewrite`
 * first, and `common` (the `responseHeaders` option's) is set with it. A plain answer
 * over HTTP/2, and every answer to a StreamRequest (which has no response object), goes
 * straight onto the stream with `common`: the compatibility layer's `setHeader` and
 * `writeHead` would check each header (twice), and its `write` and `end` add layers of
 * their own; `respond` still checks what the interceptors or the implementation set.
 * Trailers are still asked for (`waitForTrailers`, even when there are none),
 * as the compatibility layer does: a stream that ends with its last DATA frame can close
 * before its `end()` completes, and Node then makes an ERR_STREAM_DESTROYED, stack trace
 * included, for every response (about a tenth of the raw server's time in profiles).
 */
function writeUnaryAnswer(
  answer: UnaryAnswer,
  req: NodeRequest,
  res: NodeResponse | undefined,
  rewrite: ConnectHandlerOptions["errorBody"],
  common: http.OutgoingHttpHeaders | undefined,
): void {
  if (gone(req)) return;
  try {
    const { header, trailer } = answer;
    let body = answer.body;
    if (answer.status >= 400 && rewrite && !answer.final) {
      body = rewrite(req, body);
      header["content-length"] = body.byteLength;
    }
    if (res === undefined || (answer.plain && "stream" in req && !res.headersSent)) {
      // Nothing else sets headers on the response of a unary call: these are all of them.
      const { stream } = req as StreamRequest | http2.Http2ServerRequest;
      // `common` is this request's own object (see `responseHeaders`): no copy of it.
      const all: http2.OutgoingHttpHeaders = common ?? {};
      for (const k in header) all[k] = header[k];
      all[":status"] = answer.status;
      if (res === undefined) {
        (stream as TrailingStream)[kTrailer] = trailer;
        stream.on("wantTrailers", sendTrailer);
      }
      // The compatibility layer's own "wantTrailers" listener sends what addTrailers set.
      else if (trailer) (res as http2.Http2ServerResponse).addTrailers(trailer);
      stream.respond(all, { waitForTrailers: true });
      stream.end(body.byteLength > 0 ? body : undefined);
      return;
    }
    const out = res as http2.Http2ServerResponse;
    setHeaders(res, common);
    out.writeHead(answer.status, header);
    if (trailer) out.addTrailers(trailer);
    if (body.byteLength > 0) out.end(body);
    else out.end();
  } catch {
    destroy(req, res);
  }
}

/** The trailers of a unary answer written onto a StreamRequest's stream, for `sendTrailer`. */
const kTrailer = Symbol("tessera.trailer");
type TrailingStream = http2.ServerHttp2Stream & { [kTrailer]?: http.OutgoingHttpHeaders };
const NO_TRAILERS: http.OutgoingHttpHeaders = Object.freeze({});

/** "wantTrailers" listener of a StreamRequest's stream (one function for all, no closure per call). */
function sendTrailer(this: TrailingStream): void {
  this.sendTrailers(this[kTrailer] ?? NO_TRAILERS);
}

/**
 * An error response (small, unary): read it whole, let `rewrite` change the body, send it
 * with its new length. Resolves to the error's code (Canceled when it could not be sent).
 */
async function writeErrorResponse(
  uRes: UniversalServerResponse,
  req: NodeRequest,
  res: NodeResponse,
  rewrite: (req: NodeRequest, body: Uint8Array) => Uint8Array,
): Promise<number> {
  const out = res as http2.Http2ServerResponse;
  try {
    const chunks: Uint8Array[] = [];
    if (uRes.body) for await (const chunk of uRes.body) chunks.push(chunk);
    const original = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
    const code = connectErrorCode(original, uRes.status);
    const body = rewrite(req, original);
    const header = nodeHeadersOf(uRes.header) ?? {};
    header["content-length"] = body.byteLength;
    out.writeHead(uRes.status, header);
    const trailers = nodeHeadersOf(uRes.trailer);
    if (trailers) out.addTrailers(trailers);
    out.end(body);
    return code;
  } catch {
    res.destroy();
    return Code.Canceled;
  }
}

/** The protocol of a request Connect's handlers serve, by its content type (Connect GET has none). */
function protocolOf(req: NodeRequest): UnaryProtocol {
  const type = req.headers["content-type"] ?? "";
  if (type.startsWith("application/grpc-web")) return "grpc-web";
  if (type.startsWith("application/grpc")) return "grpc";
  return "connect";
}

/** The code of a Connect unary error body (`{"code":"not_found",…}`), else the HTTP status's. */
function connectErrorCode(body: Uint8Array, status: number): number {
  try {
    const code = (JSON.parse(Buffer.from(body).toString("utf8")) as { code?: unknown }).code;
    const parsed = typeof code === "string" ? codeFromString(code) : undefined;
    if (parsed !== undefined) return parsed;
  } catch {
    // Not JSON: the status tells.
  }
  return codeFromHttpStatus(status);
}

/**
 * The code a response Connect's handlers wrote ended with, read from what was written
 * (only for calls those handlers serve: streams, Connect GET, gRPC-Web text, so never on
 * the unary hot path): gRPC's grpc-status trailer, gRPC-Web's trailer frame, the error of a
 * Connect stream's end message, or a Connect unary answer's status. `last` is the last
 * body chunk, where the two framed protocols put their status.
 */
function streamedCode(uRes: UniversalServerResponse, last: Uint8Array | undefined): number {
  const grpcStatus = uRes.trailer?.get("grpc-status");
  if (grpcStatus != null) return Number(grpcStatus) || 0;
  const type = uRes.header?.get("content-type") ?? "";
  const frame = last !== undefined && last.byteLength >= 5 ? lastEnvelope(last) : undefined;
  if (type.startsWith("application/grpc-web")) {
    // The trailer frame (flag 0x80), "grpc-status: N" among its lines; -text bodies are base64.
    const text = type.includes("-text")
      ? Buffer.from(Buffer.from(last ?? EMPTY_BYTES).toString("latin1"), "base64").toString("latin1")
      : Buffer.from(frame?.data ?? EMPTY_BYTES).toString("latin1");
    const m = /grpc-status:\s*(\d+)/i.exec(text);
    return m ? Number(m[1]) : Code.Unknown;
  }
  if (type.startsWith("application/connect+")) {
    // The end-of-stream message (flag 0x02): {"error":{"code":…}} when the stream failed.
    if (frame === undefined || (frame.flags & 0b10) === 0) return Code.Unknown;
    try {
      const end = JSON.parse(Buffer.from(frame.data).toString("utf8")) as { error?: { code?: unknown } };
      if (end.error === undefined) return 0;
      return (
        (typeof end.error.code === "string" ? codeFromString(end.error.code) : undefined) ?? Code.Unknown
      );
    } catch {
      return Code.Unknown;
    }
  }
  return uRes.status < 400 ? 0 : codeFromHttpStatus(uRes.status);
}

const EMPTY_BYTES = new Uint8Array(0);

/** The last complete envelope (flags, data) of a chunk holding whole envelopes, or undefined. */
function lastEnvelope(chunk: Uint8Array): { flags: number; data: Uint8Array } | undefined {
  let found: { flags: number; data: Uint8Array } | undefined;
  let at = 0;
  while (at + 5 <= chunk.byteLength) {
    const length = new DataView(chunk.buffer, chunk.byteOffset + at + 1, 4).getUint32(0);
    if (at + 5 + length > chunk.byteLength) return found;
    found = { flags: chunk[at]!, data: chunk.subarray(at + 5, at + 5 + length) };
    at += 5 + length;
  }
  return found;
}

function drained(res: NodeResponse): Promise<void> {
  return new Promise((resolve, reject) => {
    const onDrain = () => {
      res.off("close", onClose);
      resolve();
    };
    const onClose = () => {
      res.off("drain", onDrain);
      reject(new ConnectError("the client closed the request", Code.Canceled));
    };
    res.once("drain", onDrain);
    res.once("close", onClose);
  });
}
