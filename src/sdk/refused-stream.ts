import { ConnectError, type Interceptor } from "@connectrpc/connect";

/**
 * Whether a call failed because its HTTP/2 stream was refused (RST_STREAM REFUSED_STREAM, or a
 * stream past the last one a GOAWAY accepted): the server did none of it (RFC 9113 8.7).
 * connect-node reports it as Internal with Node's stream error as the cause.
 */
export function refusedStream(err: unknown): boolean {
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
