import type * as http from "node:http";
import type * as http2 from "node:http2";

/**
 * The HTTP/2 stream server: unary calls served straight from node:http2's "stream" event,
 * everything else through Node's compatibility layer.
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
  stream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): boolean;
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
