import type * as http from "node:http";
import type * as http2 from "node:http2";
import {
  Code,
  ConnectError,
  type ConnectRouter,
  createConnectRouter,
  createMethodImplSpec,
  createServiceImplSpec,
  type MethodImplSpec,
} from "@connectrpc/connect";
import { type Compression, createMethodUrl, type UniversalHandler } from "@connectrpc/connect/protocol";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { loggableError } from "../storage/errors.js";
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
  type Verdict,
  type WireError,
  writeUnaryAnswer,
} from "./early-answers.js";
import { AdapterRequest, bodyOf, closeReason, RequestSignal } from "./node-bridge.js";
import { protocolOf, writeErrorResponse, writeResponse } from "./node-response.js";
import type { ConnectHandler, ConnectHandlerOptions } from "./options.js";
import type { StockDispatch } from "./stock-adapter.js";
import { type NodeRequest, type NodeResponse, StreamRequest } from "./stream-server.js";
import {
  createUnaryHandlers,
  type UnaryAnswer,
  type UnaryHandler,
  type UnaryProtocol,
} from "./unary-protocols.js";

export type { ConnectHandler, ConnectHandlerOptions };

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
 *   unary-protocols.ts, which answer as Connect's do without its streaming pipeline.
 * Every protocol detail (content types, compression, timeouts, envelopes, errors) is
 * @connectrpc/connect's own code; streams, Connect GET and gRPC-Web text are served by
 * Connect's handlers, untouched.
 */
export function createConnectHandler(
  options: ConnectHandlerOptions,
  serveWith?: (options: ConnectHandlerOptions) => StockDispatch,
): ConnectHandler {
  if (options.acceptCompression === undefined)
    options.acceptCompression = [
      clientFaultDecompression(compressionGzip),
      clientFaultDecompression(compressionBrotli),
    ];
  const router = createConnectRouter(options);
  // `server.transport=connect`: admitted calls go to connect-node's adapter (stock-adapter.ts).
  const stock = serveWith?.(options);
  const logger = options.logger;
  // Unary methods also get the pipeline-free handlers of unary-protocols.ts, for the
  // protocols they serve; methods registered with options of their own stay with Connect.
  const unary = new Map<string, Partial<Record<UnaryProtocol, UnaryHandler>>>();
  const addUnary = (spec: MethodImplSpec) => {
    if (spec.kind === "unary" && stock === undefined)
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
  serve.stream = (stream, headers, prepare) => {
    if (stock !== undefined) return false;
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
    if (stock !== undefined) {
      stock(
        req as Exclude<NodeRequest, StreamRequest>,
        res!,
        handler.method,
        protocol?.kind ?? protocolOf(req),
        common,
      );
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

function notFound(_req: NodeRequest, res: NodeResponse): void {
  res.statusCode = 404;
  res.end();
}
