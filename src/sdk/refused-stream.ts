import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { Http2SessionManager } from "@connectrpc/connect-node";

/**
 * connect-node's error for a stream that closed with REFUSED_STREAM without an "error" event
 * (node-universal-client.js, the stream's "close" listener: connectErrorFromH2ResetCode).
 */
const REFUSED_RESET = "http/2 stream closed with error code REFUSED_STREAM (0x7)";

/**
 * Whether a call failed because its HTTP/2 stream was refused (RST_STREAM REFUSED_STREAM, or a
 * stream past the last one a GOAWAY accepted, which nghttp2 closes with REFUSED_STREAM): the
 * server did none of it (RFC 9113 8.7). connect-node 2.1.2 reports it in one of two forms:
 * Internal with Node's ERR_HTTP2_STREAM_ERROR as the cause (the stream's "error" event, what
 * Node 20 emits for both), or Unavailable with no cause (its "close" listener, when the stream
 * closed with that code and no "error" event came first). Nothing else: a server's own error
 * with those words carries its answer's headers; a GOAWAY with an error code fails every
 * stream of the session alike (ERR_HTTP2_SESSION_ERROR), run or not, so it is not retried.
 */
export function refusedStream(err: unknown): boolean {
  if (err instanceof ConnectError && err.cause === undefined)
    return (
      err.code === Code.Unavailable &&
      err.rawMessage === REFUSED_RESET &&
      err.metadata.keys().next().done === true &&
      err.details.length === 0
    );
  const cause = err instanceof ConnectError ? err.cause : err;
  return (
    cause instanceof Error &&
    (cause as { code?: unknown }).code === "ERR_HTTP2_STREAM_ERROR" &&
    cause.message.endsWith("NGHTTP2_REFUSED_STREAM")
  );
}

/**
 * Retry a unary call once when its stream was refused. A server recycling its connections
 * (Tessera's `server.maxConnectionAgeSeconds`) sends GOAWAY, and a call the client opened as
 * it arrived is refused; grpc-js retries such a call by itself, connect-node does not. Safe
 * for any method, since the server did none of it; once, as RFC 9113 8.7 advises. Streaming
 * calls are left alone: their request may already be consumed.
 */
export const retryRefusedStream: Interceptor = (next) => async (req) => {
  if (req.stream) return next(req);
  try {
    return await next(req);
  } catch (err) {
    if (!refusedStream(err) || req.signal.aborted) throw err;
    return next(req);
  }
};

function ignoreSessionError(): void {}

/** The sessions given a permanent "error" listener. */
const guarded = new WeakSet<object>();

/**
 * connect-node's session manager, each session it makes a request on given a permanent
 * "error" listener. connect-node 2.1.2 destroys a session that reads a GOAWAY (NO_ERROR) with
 * no stream open, with an error Node emits only once the socket has closed; a request made
 * meanwhile leaves that session behind and takes its listeners off, and the error was then
 * thrown uncaught, killing the process (bench/goaway-idle-repro.ts). Any server may send that
 * GOAWAY: an idle timeout (Tessera's `server.idleTimeoutSeconds` among them), a proxy, a
 * restart. A session error always reaches its streams, so calls still fail with it. Upstream:
 * connectrpc/connect-es#1768 (open; remove this once a release carries its fix).
 */
export class GuardedSessionManager extends Http2SessionManager {
  override async request(
    ...args: Parameters<Http2SessionManager["request"]>
  ): ReturnType<Http2SessionManager["request"]> {
    const stream = await super.request(...args);
    const session = stream.session;
    if (session !== undefined && !guarded.has(session)) {
      guarded.add(session);
      session.on("error", ignoreSessionError);
    }
    return stream;
  }
}
