/**
 * What the unary handlers (unary-call.ts) read and make: the request and answer types, the
 * request headers they read, how a failed call's error is made, and the one enveloped
 * message of a gRPC or gRPC-Web request body.
 */
import type { OutgoingHttpHeaders } from "node:http";
import { Code, ConnectError, type HandlerContext, type MethodImplSpec } from "@connectrpc/connect";
import {
  type Compression,
  compressedFlag,
  compressionNegotiate,
  type createMethodSerializationLookup,
  envelopeCompress,
  envelopeDecompress,
  type Serialization,
  type UniversalServerRequest,
  type validateUniversalHandlerOptions,
} from "@connectrpc/connect/protocol";
import * as connect from "@connectrpc/connect/protocol-connect";
import * as grpc from "@connectrpc/connect/protocol-grpc";
import type { UnaryCall } from "./call-context.js";
import { UNNEGOTIATED_COMPRESSION } from "./client-faults.js";
import { isWholeBody } from "./node-bridge.js";

/** The protocols a unary call is served in here. */
export type UnaryProtocol = "connect" | "grpc" | "grpc-web";

/**
 * A request whose body is a byte stream, with Node's header object of the request (what
 * the Node adapter hands over). The handlers read the protocol headers from
 * `nodeHeaders`, so `header` (fetch Headers, made by the adapter when first read) is made
 * only if an interceptor or the implementation reads it: making it is a measurable share
 * of a unary call, and Tessera's interceptors read the Node headers instead.
 */
export type UnaryRequest = UniversalServerRequest & {
  body: AsyncIterable<Uint8Array>;
  nodeHeaders: Readonly<Record<string, string | string[] | undefined>>;
};

/**
 * Header `name` (lower case) of the request: what `req.header.get(name)` gives. Node gives
 * values without surrounding whitespace (nghttp2 refuses header fields that have it, and
 * llhttp strips it), as fetch Headers would leave them, and repeated fields as a list.
 */
export function headerOf(req: UnaryRequest, name: string): string | null {
  const value = req.nodeHeaders[name];
  if (value === undefined) return null;
  return typeof value === "string" ? value : value.join(", ");
}

/** The request headers the handlers read, by their Node (lower-case) names. */
export const H = {
  contentType: connect.headerContentType.toLowerCase(),
  connectTimeout: connect.headerTimeout.toLowerCase(),
  connectEncoding: connect.headerUnaryEncoding.toLowerCase(),
  connectAcceptEncoding: connect.headerUnaryAcceptEncoding.toLowerCase(),
  contentLength: connect.headerUnaryContentLength.toLowerCase(),
  grpcTimeout: grpc.headerTimeout.toLowerCase(),
  grpcEncoding: grpc.headerEncoding.toLowerCase(),
  grpcAcceptEncoding: grpc.headerAcceptEncoding.toLowerCase(),
};

/**
 * `parse` of a request header's value, remembered for the first few distinct values whose
 * result has no error: clients send the same content type (and mostly no timeout or encoding
 * header) on every call, and each parse made a regex match or a result object per call. The
 * results are only read; one with an error is made anew each time (an error is thrown, and
 * its metadata may be changed on its way out).
 */
export function rememberParsed<T extends object | undefined>(
  parse: (value: string | null) => T,
): (value: string | null) => T {
  const known = new Map<string | null, T>();
  return (value) => {
    const found = known.get(value);
    if (found !== undefined) return found;
    const parsed = parse(value);
    const failed = parsed !== undefined && (parsed as { error?: unknown }).error !== undefined;
    if (parsed !== undefined && !failed && known.size < REMEMBERED) known.set(value, parsed);
    return parsed;
  };
}

const REMEMBERED = 16;

/**
 * Connect's `compressionNegotiate` for one handler (its encodings, its accept-encoding header
 * name), remembered by the accepted encodings when the request itself is not compressed (the
 * result depends on nothing else then), for the same reason as {@link rememberParsed}.
 */
export function compressionNegotiator(
  available: Compression[],
  acceptHeaderName: string,
): (requested: string | null, accepted: string | null) => ReturnType<typeof compressionNegotiate> {
  const plain = rememberParsed((accepted) =>
    compressionNegotiate(available, null, accepted, acceptHeaderName),
  );
  return (requested, accepted) =>
    requested === null || requested === "identity"
      ? plain(accepted)
      : compressionNegotiate(available, requested, accepted, acceptHeaderName);
}

/**
 * The whole answer to a unary call: status, headers, the body in one piece, and HTTP
 * trailers (gRPC only), as Node header objects (lower-case names, set-cookie a list).
 */
export interface UnaryAnswer {
  status: number;
  header: OutgoingHttpHeaders;
  body: Uint8Array;
  trailer?: OutgoingHttpHeaders;
  /**
   * True when the headers and trailers are only those the protocol sets (valid, lower
   * case): nothing the interceptors or the implementation set needs checking.
   */
  plain: boolean;
  /** True when an error's body is already what is sent: the `errorBody` option does not rewrite it. */
  final?: boolean;
  /** How the call ended: 0 for success, else the Connect code it failed with (metrics, access log). */
  code: number;
}

export type UnaryHandler = (req: UnaryRequest) => Promise<UnaryAnswer>;

/** A request's headers by lower-case name, as fetch Headers' `get` reads them. */
export interface RequestHeaders {
  get(name: string): string | null;
}

/**
 * Called with the error a unary call failed with, before it is written (see
 * `ConnectHandlerOptions.callError`); returns the error to answer with, or a promise of it.
 */
export type CallErrorHook = (
  error: ConnectError,
  values: HandlerContext["values"],
  method: UnarySpec["method"],
  headers: RequestHeaders,
) => ConnectError | Promise<ConnectError>;

export type HandlerOptions = ReturnType<typeof validateUniversalHandlerOptions> & {
  callError?: CallErrorHook | undefined;
};
export type UnarySpec = Extract<MethodImplSpec, { kind: "unary" }>;
export type Lookup = ReturnType<typeof createMethodSerializationLookup>;

/**
 * What the signal of a finished call is aborted with: the same kind of AbortError that
 * `abort()` without a reason gives, made once, so that ending a call builds no
 * DOMException (and captures no stack trace) per request.
 */
export const CALL_DONE = new DOMException("This operation was aborted", "AbortError");

/** Fetch Headers as a Node header object (set-cookie kept as a list). */
export function nodeHeaders(header: Headers): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  header.forEach((value, key) => {
    out[key] = value;
  });
  const cookies = header.getSetCookie();
  if (cookies.length > 0) out["set-cookie"] = cookies;
  return out;
}

/** The error to answer a failed call with: `error`, or what the options' `callError` makes of it. */
export function callError(
  opt: HandlerOptions,
  error: ConnectError,
  context: UnaryCall,
  spec: UnarySpec,
  req: UnaryRequest,
): ConnectError | Promise<ConnectError> {
  return opt.callError
    ? opt.callError(error, context.values, spec.method, { get: (name) => headerOf(req, name) })
    : error;
}

/** Connect's handlers answer anything else thrown as an internal error (the cause kept for logs only). */
export function asConnectError(e: unknown): ConnectError {
  return e instanceof ConnectError
    ? e
    : new ConnectError("internal error", Code.Internal, undefined, undefined, e);
}

export const EMPTY = new Uint8Array(0);

/**
 * The single message of an enveloped request body. Errors, and their order, are those of
 * Connect's pipeline for a unary call (split, decompress and parse each envelope, then
 * expect exactly one message): a message over `readMaxBytes` as soon as its length is
 * known, a parse error of an extra message before "received extra input message", an
 * incomplete envelope when the body ends; but a compressed envelope without a negotiated
 * encoding is InvalidArgument, where Connect says Internal (see client-faults.ts).
 * Envelopes flagged `skipFlag` (gRPC-Web trailers) are skipped, as Connect skips them. On
 * an error the rest of the body is left unread.
 */
export function readOneEnvelopedMessage<T>(
  body: AsyncIterable<Uint8Array>,
  readMaxBytes: number,
  compression: Compression | null,
  parser: Serialization<T>,
  skipFlag: number | undefined,
): Promise<T> {
  let pending: Uint8Array = EMPTY;
  let found = false;
  let input: T | undefined;
  /** The next whole envelope of what is pending, or undefined until more bytes come. */
  const split = (): { flags: number; data: Uint8Array } | undefined => {
    if (pending.byteLength < 5) return undefined;
    const length = ((pending[1]! << 24) | (pending[2]! << 16) | (pending[3]! << 8) | pending[4]!) >>> 0;
    if (length > readMaxBytes) {
      throw new ConnectError(
        `message size ${length} is larger than configured readMaxBytes ${readMaxBytes}`,
        Code.ResourceExhausted,
      );
    }
    if (pending.byteLength < 5 + length) return undefined;
    const flags = pending[0]!;
    // A copy, as Connect's envelope decoder makes: parsed bytes fields may keep views of it.
    const data = pending.slice(5, 5 + length);
    pending = pending.subarray(5 + length);
    return { flags, data };
  };
  const accept = (flags: number, data: Uint8Array) => {
    if (skipFlag !== undefined && (flags & skipFlag) === skipFlag) return;
    const parsed = parser.parse(data);
    if (found) {
      throw new ConnectError(
        "protocol error: received extra input message for unary method",
        Code.Unimplemented,
      );
    }
    found = true;
    input = parsed;
  };
  /** The one message, once the body ended. */
  const one = (): T => {
    if (pending.byteLength > 0)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    if (!found)
      throw new ConnectError("protocol error: missing input message for unary method", Code.Unimplemented);
    return input as T;
  };
  if (compression === null && isWholeBody(body)) {
    // Without compression nothing here awaits: each chunk is taken as it comes, with no
    // promise per chunk and per envelope (envelopeDecompress's checks, made in place), and
    // the message follows the chunks' promise in one `then` (no async frame of its own).
    return body
      .readChunks((chunk) => {
        pending = pending.byteLength === 0 ? chunk : concat(pending, chunk);
        for (let env = split(); env !== undefined; env = split()) {
          if ((env.flags & compressedFlag) === compressedFlag) throw unnegotiatedCompression();
          accept(env.flags, env.data);
        }
      })
      .then(one);
  }
  return (async () => {
    const it = body[Symbol.asyncIterator]();
    let finished = false;
    try {
      for (let r = await it.next(); r.done !== true; r = await it.next()) {
        pending = pending.byteLength === 0 ? r.value : concat(pending, r.value);
        for (let env = split(); env !== undefined; env = split()) {
          if (compression === null && (env.flags & compressedFlag) === compressedFlag)
            throw unnegotiatedCompression();
          const decompressed = await envelopeDecompress(env, compression, readMaxBytes);
          accept(decompressed.flags, decompressed.data);
        }
      }
      finished = true;
    } finally {
      // Stop reading: the adapter's body discards what is left.
      if (!finished) it.return?.().catch(() => undefined);
    }
    return one();
  })();
}

/**
 * An envelope flagged compressed in a request that negotiated no encoding: Connect's
 * error, as the client's fault (client-faults.ts).
 */
function unnegotiatedCompression(): ConnectError {
  return new ConnectError(UNNEGOTIATED_COMPRESSION, Code.InvalidArgument);
}

export function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength);
  out.set(a, 0);
  out.set(b, a.byteLength);
  return out;
}

/**
 * Connect's `encodeEnvelope` (flags, the data's length big-endian, the data), in a slice of
 * Node's buffer pool and without the DataView it makes: an ArrayBuffer and a DataView less per
 * answer. Every byte is written, so the pool's unset memory never shows.
 */
export function envelope(flags: number, data: Uint8Array): Uint8Array {
  const bytes = Buffer.allocUnsafe(data.byteLength + 5);
  bytes[0] = flags;
  bytes.writeUInt32BE(data.byteLength, 1);
  bytes.set(data, 5);
  return bytes;
}

/** The envelope of `data` compressed by Connect's `envelopeCompress` (from `minBytes` on). */
export async function compressedEnvelope(
  flags: number,
  data: Uint8Array,
  compression: Compression,
  minBytes: number,
): Promise<Uint8Array> {
  const env = await envelopeCompress({ flags, data }, compression, minBytes);
  return envelope(env.flags, env.data);
}
