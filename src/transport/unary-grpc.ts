/**
 * gRPC and gRPC-Web unary calls: one handler for both, as they differ only in their content
 * types and where the status goes (HTTP trailers, or a trailer frame ending the body).
 */

import { Code, ConnectError } from "@connectrpc/connect";
import {
  type Compression,
  compressionNegotiate,
  encodeEnvelope,
  envelopeCompress,
  envelopeDecompress,
  type Serialization,
} from "@connectrpc/connect/protocol";
import * as grpc from "@connectrpc/connect/protocol-grpc";
import * as grpcWeb from "@connectrpc/connect/protocol-grpc-web";
import { invokeUnary, UnaryCall } from "./unary-call.js";
import type { HandlerOptions, Lookup, UnaryHandler, UnarySpec } from "./unary-core.js";
import { asConnectError, CALL_DONE, callError, H, headerOf, nodeHeaders } from "./unary-core.js";

/**
 * gRPC and gRPC-Web unary calls, as Connect's gRPC and gRPC-Web handlers serve them:
 * status 200, the response headers, the enveloped message, and the status in the
 * trailers (gRPC: HTTP trailers; gRPC-Web: a trailer frame at the end of the body).
 */
export function grpcUnary(
  opt: HandlerOptions,
  spec: UnarySpec,
  serialization: Lookup,
  web: boolean,
): UnaryHandler {
  const protocolName = web ? "grpc-web" : "grpc";
  const types = web ? grpcWeb : grpc;
  return async function handleGrpcUnary(req) {
    const binary = types.parseContentType(headerOf(req, H.contentType))?.binary !== false;
    const timeout = grpc.parseTimeout(headerOf(req, H.grpcTimeout), opt.maxTimeoutMs);
    const compression = compressionNegotiate(
      opt.acceptCompression,
      headerOf(req, H.grpcEncoding),
      headerOf(req, H.grpcAcceptEncoding),
      grpc.headerAcceptEncoding,
    );
    const initialHeader: Record<string, string> = {
      "content-type": binary ? types.contentTypeProto : types.contentTypeJson,
    };
    if (compression.response) initialHeader["grpc-encoding"] = compression.response.name;
    const context = new UnaryCall(
      spec.method,
      protocolName,
      req,
      opt.shutdownSignal,
      timeout.timeoutMs,
      initialHeader,
      GRPC_OK,
    );
    let message: Uint8Array | undefined;
    let code = 0;
    try {
      if (compression.error) throw compression.error;
      if (timeout.error) throw timeout.error;
      const input = await readOneEnvelopedMessage(
        req.body,
        opt.readMaxBytes,
        compression.request,
        serialization.getI(binary),
        web ? grpcWeb.trailerFlag : undefined,
      );
      const output = await invokeUnary(spec, context, input, opt.interceptors);
      const env = await envelopeCompress(
        { flags: 0, data: serialization.getO(binary).serialize(output) },
        compression.response,
        opt.compressMinBytes,
      );
      message = encodeEnvelope(env.flags, env.data);
      context.abort(CALL_DONE);
    } catch (e) {
      context.abort(e);
      const answered = callError(opt, asConnectError(e), context, spec, req);
      const error = answered instanceof Promise ? await answered : answered;
      code = error.code;
      grpc.setTrailerStatus(context.responseTrailer, error);
    }
    // Nothing read or changed the response headers or trailers: what they would hold.
    const touched = context.responseTouched;
    const header = touched ? nodeHeaders(context.responseHeader) : { ...initialHeader };
    if (!web) {
      const trailer = touched ? nodeHeaders(context.responseTrailer) : { ...GRPC_OK };
      return { status: 200, header, body: message ?? EMPTY, trailer, plain: !touched, code };
    }
    const trailer = await envelopeCompress(
      {
        flags: grpcWeb.trailerFlag,
        data: touched ? grpcWeb.trailerSerialize(context.responseTrailer) : GRPC_WEB_OK,
      },
      compression.response,
      opt.compressMinBytes,
    );
    const frame = encodeEnvelope(trailer.flags, trailer.data);
    return { status: 200, header, body: message ? concat(message, frame) : frame, plain: !touched, code };
  };
}

const EMPTY = new Uint8Array(0);
/** The trailers of a successful gRPC call, and their gRPC-Web trailer frame's data. */
const GRPC_OK: Readonly<Record<string, string>> = { "grpc-status": grpc.grpcStatusOk };
const GRPC_WEB_OK = grpcWeb.trailerSerialize(new Headers(GRPC_OK));

/**
 * The single message of an enveloped request body. Errors, and their order, are those of
 * Connect's pipeline for a unary call (split, decompress and parse each envelope, then
 * expect exactly one message): a message over `readMaxBytes` as soon as its length is
 * known, a parse error of an extra message before "received extra input message", an
 * incomplete envelope when the body ends. Envelopes flagged `skipFlag` (gRPC-Web
 * trailers) are skipped, as Connect skips them. On an error the rest of the body is
 * left unread.
 */
async function readOneEnvelopedMessage<T>(
  body: AsyncIterable<Uint8Array>,
  readMaxBytes: number,
  compression: Compression | null,
  parser: Serialization<T>,
  skipFlag: number | undefined,
): Promise<T> {
  const it = body[Symbol.asyncIterator]();
  let pending: Uint8Array = EMPTY;
  let found = false;
  let input: T | undefined;
  let finished = false;
  try {
    for (let r = await it.next(); r.done !== true; r = await it.next()) {
      pending = pending.byteLength === 0 ? r.value : concat(pending, r.value);
      while (pending.byteLength >= 5) {
        const length = new DataView(pending.buffer, pending.byteOffset + 1, 4).getUint32(0);
        if (length > readMaxBytes) {
          throw new ConnectError(
            `message size ${length} is larger than configured readMaxBytes ${readMaxBytes}`,
            Code.ResourceExhausted,
          );
        }
        if (pending.byteLength < 5 + length) break;
        const flags = pending[0]!;
        // A copy, as Connect's envelope decoder makes: parsed bytes fields may keep views of it.
        const data = pending.slice(5, 5 + length);
        pending = pending.subarray(5 + length);
        const env = await envelopeDecompress({ flags, data }, compression, readMaxBytes);
        if (skipFlag !== undefined && (env.flags & skipFlag) === skipFlag) continue;
        const parsed = parser.parse(env.data);
        if (found) {
          throw new ConnectError(
            "protocol error: received extra input message for unary method",
            Code.Unimplemented,
          );
        }
        found = true;
        input = parsed;
      }
    }
    finished = true;
  } finally {
    // Stop reading: the adapter's body discards what is left.
    if (!finished) it.return?.().catch(() => undefined);
  }
  if (pending.byteLength > 0)
    throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
  if (!found)
    throw new ConnectError("protocol error: missing input message for unary method", Code.Unimplemented);
  return input as T;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength);
  out.set(a, 0);
  out.set(b, a.byteLength);
  return out;
}
