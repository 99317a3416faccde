import { Code, ConnectError } from "@connectrpc/connect";
import type { Compression } from "@connectrpc/connect/protocol";

/**
 * Errors Connect raises as Internal about what the client sent, answered as the client's
 * fault on both transports: a client mistake is 4xx; Internal means a bug in Tessera.
 */

/**
 * Connect's message for an envelope flagged compressed in a request that negotiated no
 * encoding (no `grpc-encoding` or `connect-content-encoding`, or "identity"): its
 * `envelopeDecompress` raises it as Internal, which gRPC's compression.md asks for this
 * case. Deliberately InvalidArgument here, as every other malformed request: the request
 * is wrong whatever the server is, and Tessera's Internal (counted, logged) means its bug.
 */
export const UNNEGOTIATED_COMPRESSION = "received compressed envelope, but do not know how to decompress";

/**
 * `error` as the client's fault when it is one of Connect's Internal errors about the
 * request's bytes (a compressed envelope without an encoding, a binary message that does
 * not parse): InvalidArgument with the same message; else undefined.
 */
export function clientFaultOf(error: unknown): ConnectError | undefined {
  if (!(error instanceof ConnectError) || error.code !== Code.Internal) return undefined;
  const message = error.rawMessage;
  if (message !== UNNEGOTIATED_COMPRESSION && !message.startsWith("parse binary: ")) return undefined;
  return new ConnectError(message, Code.InvalidArgument, undefined, undefined, error);
}

/**
 * `compression` with request bodies that do not decompress answered as the client's fault:
 * connect-node maps only some zlib errors to InvalidArgument, and a truncated gzip body
 * (Z_BUF_ERROR, "unexpected end of file") was Internal. Whatever fails to decompress is
 * what the client sent; compressing our answers is untouched. Used for every protocol,
 * on Connect's handlers and on the unary handlers alike (both take `acceptCompression`).
 */
export function clientFaultDecompression(compression: Compression): Compression {
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

/**
 * A request's messages with Connect's Internal errors about their bytes raised as the
 * client's fault: a stream's messages are read after the request was handed to the
 * interceptors, so the errors of reading them surface here, not before the pipeline.
 */
export async function* clientFaultMessages<T>(messages: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (e) {
    throw clientFaultOf(e) ?? e;
  }
}
