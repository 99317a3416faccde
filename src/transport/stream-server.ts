import type * as http from "node:http";
import type * as http2 from "node:http2";
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalHandler } from "@connectrpc/connect/protocol";
import { boundDeadlineHeaders } from "./deadlines.js";
import {
  destroy,
  discardBody,
  type EarlyProtocol,
  earlyAnswer,
  earlyProtocol,
  gone,
  readableOf,
  setHeaders,
  stopUnreadBody,
  stopUnreadPlainBody,
  type Verdict,
  type WireError,
  writeUnaryAnswer,
} from "./early-answers.js";
import { answerFailedCall, internalErrorOf } from "./last-resort.js";
import {
  AdapterRequest,
  bodyOf,
  closeReason,
  joinRepeatedAuthorization,
  RequestSignal,
} from "./node-bridge.js";
import { protocolOf, writeErrorResponse, writeResponse } from "./node-response.js";
import type { ConnectHandler, ConnectHandlerOptions } from "./options.js";
import type { StockDispatch } from "./stock-adapter.js";
import type { UnaryAnswer, UnaryHandler, UnaryProtocol } from "./unary-protocols.js";

/**
 * The stream server: where an RPC call is served, from node:http2's "stream" event (a unary
 * call over HTTP/2) or from Node's compatibility layer (everything else), to its answer.
 * In order, each a plain call: the route of the path, the request's facts (`prepare`), the
 * common headers, admission before the body is read (`admit`: src/admission/index.ts), then
 * either the refusal written at once (early-answers.ts) or the call dispatched to its unary
 * handler (unary-call.ts), whose answer is written onto the stream in one go. What is not a
 * unary call the unary handlers serve goes to Connect's own handlers (node-response.ts
 * writes their answers), or to connect-node's adapter under `server.transport=connect`.
 */

/** A request as the adapter and its options' callbacks see it. */
export type NodeRequest = http.IncomingMessage | http2.Http2ServerRequest | StreamRequest;
export type NodeResponse = http.ServerResponse | http2.Http2ServerResponse;

/**
 * A request listener for Node's HTTP servers that can also serve some HTTP/2 streams
 * straight from the server's "stream" event: `stream` returns false, having done nothing,
 * for a stream it leaves to the compatibility layer (see {@link serveRequests}).
 */
export interface StreamingHandler {
  (req: http.IncomingMessage | http2.Http2ServerRequest, res: NodeResponse): void;
  stream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, rawHeaders: string[]): boolean;
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
    /** The header list as received (the session's "stream" event gives it), as `Http2ServerRequest.rawHeaders`. */
    readonly rawHeaders: string[],
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
      // Refused by a bound before this listener ran (server.maxOpenStreamsPerIp: RST_STREAM
      // REFUSED_STREAM promises the client none of its call ran, and a flood costs no more).
      if (stream.closed) return;
      if (!handler.stream(stream, headers, rawHeaders))
        onCompatStream.call(this, stream, headers, flags, rawHeaders);
    },
  );
}

/** An RPC path: Connect's handler for it, and the unary handlers by protocol when it has them. */
export interface Route {
  handler: UniversalHandler;
  unary: Partial<Record<UnaryProtocol, UnaryHandler>> | undefined;
}

/**
 * The request listener serving the RPC paths `paths` (built by fast-adapter.ts's
 * `createConnectHandler`) with `options`: a unary POST over HTTP/2 from its stream (`stream`),
 * any other request from Node's request and response; admitted calls go to connect-node's
 * adapter instead when `stock` is given (`server.transport=connect`).
 */
export function serveCalls(
  paths: ReadonlyMap<string, Route>,
  stock: StockDispatch | undefined,
  options: ConnectHandlerOptions,
): ConnectHandler {
  const onNotFound = options.onNotFound;
  const prepare = options.prepare;
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
    // Before anything reads the credential: admission here, or in the pipeline, or connect-node's.
    joinRepeatedAuthorization(req);
    const common = responseHeaders?.(req);
    if (!route) {
      setHeaders(res!, common);
      res!.statusCode = 404;
      res!.end();
      onNotFound?.(req);
      // A made-up path is answered without its body: left open, each stream stayed held (one
      // of maxConcurrentStreams, unbudgeted) until requestTimeoutSeconds.
      stopUnreadPlainBody(req, res!, readMaxBytes);
      return;
    }
    const { handler } = route;
    const protocol =
      handler.method.methodKind === "unary"
        ? earlyProtocol(req.method, req.headers["content-type"])
        : undefined;
    // Only a call that can be answered before its body is admitted here; any other (a
    // stream, a content type answered later) is admitted once, by the admission interceptor.
    if (admit === undefined || protocol === undefined) {
      dispatch(route, protocol, req, res, common);
      return;
    }
    const early = protocol;
    let verdict: ReturnType<typeof admit>;
    try {
      verdict = admit(req, handler.method);
    } catch (err) {
      verdict = internalErrorOf(options, req, handler.method, err, "rpc admission failed");
    }
    if (verdict === undefined) dispatch(route, protocol, req, res, common);
    else if (!isPromise(verdict)) answer(verdict);
    else
      verdict.then(
        (error) => (error === undefined ? dispatch(route, protocol, req, res, common) : answer(error)),
        (err: unknown) => answer(internalErrorOf(options, req, handler.method, err, "rpc admission failed")),
      );

    function answer(error: ConnectError | WireError) {
      discardBody(req, res, readMaxBytes);
      if (gone(req)) {
        onCallEnd?.(req, handler.method, early.kind, Code.Canceled);
        return;
      }
      let answered: UnaryAnswer;
      try {
        answered = earlyAnswer(early, error, options.jsonOptions);
      } catch {
        destroy(req, res);
        onCallEnd?.(req, handler.method, early.kind, Code.Internal);
        return;
      }
      writeUnaryAnswer(answered, req, res, errorBody, common);
      onCallEnd?.(req, handler.method, early.kind, answered.code);
    }
  }

  const serve = handleConnect as ConnectHandler;
  serve.methodOf = (url) => routeOf(url)?.handler.method;
  serve.stream = (stream, headers, rawHeaders) => {
    if (stock !== undefined) return false;
    const route = acceptedRoute(headers);
    if (route === undefined) return false;
    const req = new StreamRequest(stream, headers, rawHeaders);
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
    // Thrown out of the request listener (or out of admission's promise), an error would end
    // the process (none is expected: see stock-adapter.ts for the one connect-node had): the
    // call is answered Internal instead, and reported here, as nothing reported it yet (a
    // stock dispatch that throws reports nothing: StockDispatch).
    try {
      if (stock === undefined) serveFast(route, protocol, req, res, common);
      else {
        // Connect's handlers arm a timer for the client's deadline: one a timer can hold (deadlines.ts).
        boundDeadlineHeaders(req.headers);
        stock(
          req as Exclude<NodeRequest, StreamRequest>,
          res!,
          handler.method,
          protocol?.kind ?? protocolOf(req),
          common,
        );
      }
    } catch (err) {
      const error = internalErrorOf(options, req, handler.method, err, "rpc handler failed");
      const code = gone(req) ? Code.Canceled : error.code;
      answerFailedCall(req, res, protocol, error, options, common);
      onCallEnd?.(req, handler.method, protocol?.kind ?? protocolOf(req), code);
      // The fast transport's body reader may have started (and paused): what the client still
      // sends is dropped, as after any answer given before the body's end.
      if (stock === undefined) stopUnreadBody(req, res, readMaxBytes);
    }
  }

  /** Serve an admitted call on the fast transport; a throw here has reported nothing (see `dispatch`). */
  function serveFast(
    route: Route,
    protocol: EarlyProtocol | undefined,
    req: NodeRequest,
    res: NodeResponse | undefined,
    common: http.OutgoingHttpHeaders | undefined,
  ): void {
    const { handler } = route;
    const url = req.url ?? "";
    const signal = new RequestSignal();
    // Whether the answer was written (through `res`, or by writeUnaryAnswer on the HTTP/2 stream).
    let answered = false;
    const onClose = () => {
      // Closed before the response was ended: the client went away (an HTTP/2 reset, a
      // dropped connection). A response ended by us closes normally and aborts nothing.
      if (!answered && !res?.writableEnded) signal.abort(closeReason(req));
    };
    // A StreamRequest's stream closes when the compatibility layer's response would; its
    // body's "close" listener, on that same stream, calls onClose (see bodyOf).
    if (res !== undefined) res.on("close", onClose);
    // HTTP/2 carries the scheme (req.socket would build a Proxy per stream); HTTP/1.1 has the socket.
    const encrypted =
      "scheme" in req ? req.scheme === "https" : "encrypted" in req.socket && req.socket.encrypted;
    const authority = "authority" in req ? req.authority : req.headers.host;
    // Before the body reader starts: a hook that throws leaves an unread body that `dispatch`
    // can still drop (a reader started and paused would hold it).
    const values = options.contextValues?.(req);
    const uReq = new AdapterRequest(
      req.httpVersion,
      req.method ?? "",
      `${encrypted ? "https" : "http"}://${authority ?? "localhost"}${url}`,
      req.headers,
      // A StreamRequest's stream has an "error" listener of its own: an error destroys the
      // stream, and its "close" before "end" tells the body reader the client went away.
      bodyOf(readableOf(req), !(req instanceof StreamRequest), maxBodyBytes, res ? undefined : onClose),
      signal as unknown as AbortSignal,
      values,
    );
    const onError = (err: unknown) => {
      const code = ConnectError.from(err).code;
      onCallEnd?.(req, handler.method, protocol?.kind ?? protocolOf(req), Code.Internal);
      // A client gone (a reset, a hang-up) is not our fault: nothing to log nor to answer.
      if (code === Code.Aborted || code === Code.Canceled) {
        if (res === undefined) (req as StreamRequest).stream.destroy();
        else res.destroy();
        return;
      }
      const error = internalErrorOf(options, req, handler.method, err, "rpc handler failed");
      answerFailedCall(req, res, protocol, error, options, common);
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
    boundDeadlineHeaders(req.headers);
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

function isPromise(verdict: Verdict | Promise<Verdict>): verdict is Promise<Verdict> {
  return typeof (verdict as Partial<Promise<Verdict>>).then === "function";
}

/** For the streams served without the compatibility layer, whose own "error" listener swallows stream errors. */
function ignoreStreamError(): void {}
