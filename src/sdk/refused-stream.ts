import http2 from "node:http2";
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
 * closed with that code and no "error" event came first). Or, past the last stream of a GOAWAY
 * with an error code, Internal with an {@link UnprocessedStreamError} as the cause (see
 * {@link GuardedSessionManager}). Nothing else: a server's own error with those words carries
 * its answer's headers; a stream up to that GOAWAY's last one fails with Node's
 * ERR_HTTP2_SESSION_ERROR, and may have run.
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
    cause instanceof UnprocessedStreamError ||
    (cause instanceof Error &&
      (cause as { code?: unknown }).code === "ERR_HTTP2_STREAM_ERROR" &&
      cause.message.endsWith("NGHTTP2_REFUSED_STREAM"))
  );
}

/**
 * What a stream past the last stream id of a GOAWAY with an error code fails with: the server
 * processed none of it (RFC 9113 6.8). Node 20 fails every stream of that session with one
 * and the same ERR_HTTP2_SESSION_ERROR, whatever its id: this one tells the unprocessed apart.
 */
export class UnprocessedStreamError extends Error {
  override readonly name = "UnprocessedStreamError";
  constructor(id: number | undefined, code: number, lastStreamId: number) {
    super(
      `the server sent GOAWAY with error code ${code} and last stream ${lastStreamId}: stream ${id ?? "(not sent)"} was not processed`,
    );
  }
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

/** The sessions given their listeners, with their streams not yet closed (each leaves on "close"). */
const sessions = new WeakMap<http2.ClientHttp2Session, Set<http2.ClientHttp2Stream>>();

/**
 * A GOAWAY with an error code read on a session (`this`): Node then destroys the session and
 * fails each of its streams with the same session error, run or not. Run before that (Node
 * emits "goaway" first), this fails those past the last stream id, which the server never
 * processed, with an {@link UnprocessedStreamError} of their own, which the retry recognises.
 * A GOAWAY without an error code needs nothing: nghttp2 closes those with REFUSED_STREAM.
 */
function onGoaway(this: http2.ClientHttp2Session, code: number, lastStreamId: number): void {
  const open = sessions.get(this);
  if (code === http2.constants.NGHTTP2_NO_ERROR || open === undefined) return;
  for (const stream of [...open]) {
    const id = stream.id;
    if (!stream.destroyed && (id === undefined || id > lastStreamId))
      stream.destroy(new UnprocessedStreamError(id, code, lastStreamId));
  }
  open.clear();
}

/**
 * connect-node's session manager, each session it makes a request on given a permanent
 * "error" listener. connect-node 2.1.2 destroys a session that reads a GOAWAY (NO_ERROR) with
 * no stream open, with an error Node emits only once the socket has closed; a request made
 * meanwhile leaves that session behind and takes its listeners off, and the error was then
 * thrown uncaught, killing the process (bench/goaway-idle-repro.ts). Any server may send that
 * GOAWAY: an idle timeout (Tessera's `server.idleTimeoutSeconds` among them), a proxy, a
 * restart. A session error always reaches its streams, so calls still fail with it. Upstream:
 * connectrpc/connect-es#1768 (open; remove this once a release carries its fix). The streams
 * it makes are held too, to fail those a GOAWAY with an error code left unprocessed with an
 * error of their own (see `onGoaway`).
 */
export class GuardedSessionManager extends Http2SessionManager {
  override async request(
    ...args: Parameters<Http2SessionManager["request"]>
  ): ReturnType<Http2SessionManager["request"]> {
    const stream = await super.request(...args);
    const session = stream.session as http2.ClientHttp2Session | undefined;
    if (session === undefined) return stream;
    let open = sessions.get(session);
    if (open === undefined) {
      open = new Set();
      sessions.set(session, open);
      session.on("error", ignoreSessionError);
      session.on("goaway", onGoaway);
    }
    // Dropped as it closes: a closed stream keeps connect-node's call state (its headers, a
    // bearer token among them) alive, and a burst of calls must not be held after it.
    const held = open;
    held.add(stream);
    stream.once("close", () => held.delete(stream));
    return stream;
  }
}
