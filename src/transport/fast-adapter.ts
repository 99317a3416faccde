import {
  type ConnectRouter,
  createConnectRouter,
  createMethodImplSpec,
  createServiceImplSpec,
  type Interceptor,
  type MethodImplSpec,
} from "@connectrpc/connect";
import { createMethodUrl } from "@connectrpc/connect/protocol";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";
import { clientFaultDecompression, clientFaultMessages } from "./client-faults.js";
import type { ConnectHandler, ConnectHandlerOptions } from "./options.js";
import type { StockDispatch } from "./stock-adapter.js";
import { type Route, serveCalls } from "./stream-server.js";
import { createUnaryHandlers, type UnaryHandler, type UnaryProtocol } from "./unary-protocols.js";

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
 *
 * This builds the routes once (Connect's router, and the unary handlers of each unary
 * method); a call itself is served by stream-server.ts's `serveCalls`.
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
  // Connect's handlers (streams on both transports, every call on the stock one) run the
  // stream rules first; the unary handlers of unary-protocols.ts have no streams to rule.
  const routerOptions = { ...options, interceptors: [streamCallRules, ...(options.interceptors ?? [])] };
  const router = createConnectRouter(routerOptions);
  // `server.transport=connect`: admitted calls go to connect-node's adapter (stock-adapter.ts).
  const stock = serveWith?.(routerOptions);
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
  return serveCalls(paths, stock, options);
}

/**
 * The first interceptor of every streaming call, on both transports (Connect's own handlers
 * serve streams on each): the request's messages with Connect's Internal errors about their
 * bytes raised as the client's fault (client-faults.ts). A stream's deadline and the errors
 * of its answer are the error interceptor's (interceptors/index.ts).
 */
const streamCallRules: Interceptor = (next) => (req) =>
  req.stream ? next({ ...req, message: clientFaultMessages(req.message) }) : next(req);
