import type * as http2 from "node:http2";
import { createConnectHandler } from "./fast-adapter.js";
import type { ConnectHandler, ConnectHandlerOptions } from "./options.js";
import { createStockDispatch } from "./stock-adapter.js";
import { serveRequests } from "./stream-server.js";

/**
 * The transport boundary: what speaks the wire for the RPC paths. server/request-handler.ts
 * builds one with {@link createTransport}, server.ts installs it with {@link installTransport};
 * nothing else of src/transport/ is its concern.
 *
 * - `fast` (the default): Tessera's own bridge between Node and Connect's router
 *   (fast-adapter.ts builds the routes, stream-server.ts serves a call, over node-bridge.ts and
 *   node-response.ts), unary calls answered by unary-call.ts, over HTTP/2 straight from the
 *   stream.
 * - `connect`: connect-node's stock `connectNodeAdapter` serves every admitted call
 *   (stock-adapter.ts), through Node's compatibility layer.
 *
 * Both admit calls before their body is read and answer refusals the same way
 * (early-answers.ts, error-wire.ts), with the same headers, limits, error envelope and
 * call observer: a client cannot tell them apart (test/unary-handlers.test.ts compares them).
 *
 * Implementations may answer with {@link frozenAnswer}: an answer that never changes, which
 * the fast transport encodes once per encoding (frozen-answers.ts).
 */
export type TransportKind = "fast" | "connect";

export { frozenAnswer } from "./frozen-answers.js";

/** The request handler of the RPC paths, as {@link createTransport} makes it (options.ts). */
export type Transport = ConnectHandler;
export type TransportOptions = ConnectHandlerOptions;

/** The transport of `kind` serving `options.routes` with `options`' limits and hooks. */
export function createTransport(kind: TransportKind, options: TransportOptions): Transport {
  return createConnectHandler(options, kind === "connect" ? createStockDispatch : undefined);
}

/**
 * Serve `handler` on `server`: every request through it, and HTTP/2 streams its `stream`
 * takes without Node's compatibility layer (see stream-server.ts).
 */
export function installTransport(
  server: http2.Http2Server | http2.Http2SecureServer,
  handler: Parameters<typeof serveRequests>[1],
): void {
  serveRequests(server, handler);
}
