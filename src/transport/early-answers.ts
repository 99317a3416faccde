import type * as http from "node:http";
import type * as http2 from "node:http2";
import { constants as http2constants } from "node:http2";
import type { Readable } from "node:stream";
import type { JsonWriteOptions } from "@bufbuild/protobuf";
import { type Code, ConnectError } from "@connectrpc/connect";
import { encodeEnvelope } from "@connectrpc/connect/protocol";
import {
  codeToHttpStatus,
  contentTypeUnaryJson as connectJson,
  contentTypeUnaryRegExp as connectUnaryType,
  endStreamFlag,
  endStreamToJson,
  errorToJsonBytes,
} from "@connectrpc/connect/protocol-connect";
import {
  contentTypeJson as grpcJson,
  contentTypeProto as grpcProto,
  contentTypeRegExp as grpcType,
  setTrailerStatus,
} from "@connectrpc/connect/protocol-grpc";
import {
  contentTypeJson as grpcWebJson,
  contentTypeProto as grpcWebProto,
  contentTypeRegExp as grpcWebType,
  trailerFlag,
  trailerSerialize,
} from "@connectrpc/connect/protocol-grpc-web";
import { answerDate } from "./answer-date.js";
import { type NodeRequest, type NodeResponse, StreamRequest } from "./stream-server.js";
import { nodeHeaders, type UnaryAnswer } from "./unary-protocols.js";

/**
 * Early answers: a call refused before the RPC pipeline (by `admit`), written in its
 * protocol as Connect would write the error, with the request body left unread; and the
 * writers of unary answers onto Node's response or the HTTP/2 stream.
 */

export function ignoreChunk(): void {}

/** What `admit` decides: go on (undefined), or answer with an error. */
export type Verdict = ConnectError | WireError | undefined;

/**
 * An error `admit` answers a call with, already in wire form: what Connect would write for
 * it, made by the caller without a ConnectError (e.g. cheaper, or with parts made once).
 */
export interface WireError {
  readonly code: Code;
  /** The Connect protocol's answer: its headers (a new object) and its JSON body, final (`errorBody` is not applied to it). */
  connect(): { header: http.OutgoingHttpHeaders; body: Uint8Array };
  /** The gRPC status trailers (a new object): the error's metadata, grpc-status, grpc-message, grpc-status-details-bin. */
  grpcTrailers(): http.OutgoingHttpHeaders;
}

/** The protocols of a unary POST this adapter answers itself: an early error (see `admit`), or the whole call (unary-protocols.ts). */
export type EarlyProtocol =
  | { readonly kind: "connect" }
  | { readonly kind: "grpc" | "grpc-web"; readonly json: boolean };

/** The protocol of a unary POST this adapter can answer itself, or undefined (left to Connect's handlers). */
export function earlyProtocol(
  method: string | undefined,
  type: string | undefined,
): EarlyProtocol | undefined {
  if (method !== "POST" || type === undefined) return undefined;
  // Remembered for the first few content types: asked twice per call, and a gRPC type's
  // parse made a regex match and an object each time. The results are only read.
  const known = knownProtocols.get(type);
  if (known !== undefined || knownProtocols.has(type)) return known;
  const protocol = protocolOfType(type);
  if (knownProtocols.size < 16) knownProtocols.set(type, protocol);
  return protocol;
}

const knownProtocols = new Map<string, EarlyProtocol | undefined>();

function protocolOfType(type: string): EarlyProtocol | undefined {
  if (connectUnaryType.test(type)) return { kind: "connect" };
  let m = grpcType.exec(type);
  if (m) return { kind: "grpc", json: m[1] !== undefined };
  m = grpcWebType.exec(type);
  // grpc-web-text (base64 framing) is left to Connect.
  if (m && m[1] === undefined) return { kind: "grpc-web", json: m[2] !== undefined };
  return undefined;
}

/** Set `headers` on the response (nothing when there are none); a header whose value is undefined is left out, as HTTP/2's `respond` leaves it out. */
export function setHeaders(res: NodeResponse, headers: http.OutgoingHttpHeaders | undefined): void {
  if (headers === undefined) return;
  for (const k in headers) {
    const value = headers[k];
    if (value !== undefined) res.setHeader(k, value);
  }
}

export function gone(req: NodeRequest): boolean {
  return "stream" in req ? req.stream.destroyed : req.socket.destroyed;
}

/** Where the request body is read from: a StreamRequest's stream, or the request object itself. */
export function readableOf(req: NodeRequest): Readable {
  return req instanceof StreamRequest ? req.stream : req;
}

/** Drop the request's stream or response, after a failure to answer. */
export function destroy(req: NodeRequest, res: NodeResponse | undefined): void {
  if (res === undefined) (req as StreamRequest).stream.destroy();
  else res.destroy();
}

/**
 * After a unary answer was written, a body that was not read to its end (the call was
 * refused before, or because of, what the client was still sending) is not left pending:
 * HTTP/2 resets the stream once the answer is out (RST_STREAM NO_ERROR, RFC 9113 §8.1),
 * HTTP/1.1 discards up to `limit` bytes and then closes the connection (see discardBody).
 */
export function stopUnreadBody(
  req: NodeRequest,
  res: NodeResponse | undefined,
  limit: number,
  trailers = true,
): void {
  const source = readableOf(req);
  if (source.readableEnded || source.destroyed) return;
  if ("stream" in req) {
    resetWhenAnswered(req, trailers);
    return;
  }
  discardBody(req, res, limit);
  // bodyOf paused it when it stopped reading.
  source.resume();
}

/**
 * HTTP/2: close the request's stream with NO_ERROR once the answer is out (what the client
 * still sends is dropped). `trailers`: whether the answer ends with trailers; one that does
 * not (a 404, the OAuth endpoints' JSON) may go out with END_STREAM on its headers, and then
 * "wantTrailers" never comes: its stream's "finish" is waited for instead.
 */
function resetWhenAnswered(req: NodeRequest & { stream: http2.Http2Stream }, trailers = true): void {
  const stream = req.stream as http2.ServerHttp2Stream;
  let waits = 0;
  // Closed once nghttp2 has sent the end of the answer (END_STREAM: `localClose`). An
  // RST_STREAM submitted before goes out first (nghttp2 sends it ahead of queued frames) and
  // the trailers, with the gRPC status, would be lost. Node writes on a native immediate, so
  // this waits an immediate at a time, a few at most (a client that reads nothing cannot
  // hold the stream open: it is closed anyway then).
  const stop = () => {
    if (stream.closed || stream.destroyed) return;
    if (stream.state.localClose !== 1 && waits++ < 8) setImmediate(stop);
    else stream.close(http2constants.NGHTTP2_NO_ERROR);
  };
  if (!trailers) {
    if (stream.writableFinished) setImmediate(stop);
    else stream.once("finish", () => setImmediate(stop));
  }
  // Every answer with trailers asks for them (`waitForTrailers`, here and in the
  // compatibility layer): it ends once its "wantTrailers" listener has sent them.
  else if (stream.sentTrailers !== undefined) stop();
  else stream.once("wantTrailers", () => setImmediate(stop));
}

/** {@link stopUnreadBody} for an answer without trailers (a 404, the OAuth endpoints' JSON). */
export function stopUnreadPlainBody(req: NodeRequest, res: NodeResponse, limit: number): void {
  stopUnreadBody(req, res, limit, false);
}

/**
 * Discard the body of a request answered without reading it: HTTP/2 asks the client to
 * stop sending as soon as the answer is out (RST_STREAM NO_ERROR, RFC 9113 §8.1), so a
 * refused upload is not read at all; HTTP/1.1, which cannot refuse the rest of a request
 * and keep the connection, reads up to `limit` bytes (what Connect would have read) and
 * past that closes the connection, so a refused caller cannot keep the server reading.
 */
export function discardBody(req: NodeRequest, res: NodeResponse | undefined, limit: number): void {
  const source = readableOf(req);
  if ("stream" in req && !source.readableEnded) {
    // Dropped as it comes until the reset: a paused stream would hold the client's window.
    source.on("data", ignoreChunk);
    resetWhenAnswered(req);
    return;
  }
  let seen = 0;
  const onData = (chunk: Buffer) => {
    seen += chunk.byteLength;
    if (seen <= limit) return;
    source.off("data", onData);
    const stop = () => {
      if ("stream" in req) req.stream.close(http2constants.NGHTTP2_NO_ERROR);
      else req.socket.destroy();
    };
    // HTTP/2: the stream's own "finish" (the compatibility layer's response emits one only
    // once the stream has closed, which a client still sending keeps from happening).
    const written = "stream" in req ? req.stream : res!;
    if (written.writableFinished) stop();
    else written.once("finish", stop);
  };
  source.on("data", onData);
}

/**
 * The answer to a refused call: `error` as Connect's handler for the protocol would
 * answer it (same status, headers, trailers and body; the body of a Connect error still
 * passes through `errorBody` in writeUnaryAnswer).
 */
export function earlyAnswer(
  protocol: EarlyProtocol,
  error: ConnectError | WireError,
  jsonOptions: Partial<JsonWriteOptions> | undefined,
): UnaryAnswer {
  const wire = error instanceof ConnectError ? undefined : error;
  if (protocol.kind === "connect") {
    const status = codeToHttpStatus(error.code);
    if (wire) return { status, ...wire.connect(), plain: false, final: true, code: error.code };
    const body = errorToJsonBytes(error as ConnectError, jsonOptions ?? {});
    const header = nodeHeaders((error as ConnectError).metadata);
    header["content-type"] = connectJson;
    header["content-length"] = body.byteLength;
    return { status, header, body, plain: false, code: error.code };
  }
  const trailer = wire
    ? wire.grpcTrailers()
    : nodeHeaders(setTrailerStatus(new Headers(), error as ConnectError));
  if (protocol.kind === "grpc") {
    return {
      status: 200,
      header: { "content-type": protocol.json ? grpcJson : grpcProto },
      body: new Uint8Array(0),
      trailer,
      plain: false,
      code: error.code,
    };
  }
  // gRPC-Web: the trailers travel in the body, as a trailer frame.
  return {
    status: 200,
    header: { "content-type": protocol.json ? grpcWebJson : grpcWebProto },
    body: encodeEnvelope(trailerFlag, trailerSerialize(new Headers(trailer as Record<string, string>))),
    plain: false,
    code: error.code,
  };
}

/**
 * Write a unary answer in one go; an error body (status ≥ 400) passes through `rewrite`
 * first, and `common` (the `responseHeaders` option's) is set with it. A plain answer
 * over HTTP/2, and every answer to a StreamRequest (which has no response object), goes
 * straight onto the stream with `common`: the compatibility layer's `setHeader` and
 * `writeHead` would check each header (twice), and its `write` and `end` add layers of
 * their own; `respond` still checks what the interceptors or the implementation set.
 * Trailers are still asked for (`waitForTrailers`, even when there are none),
 * as the compatibility layer does: a stream that ends with its last DATA frame can close
 * before its `end()` completes, and Node then makes an ERR_STREAM_DESTROYED, stack trace
 * included, for every response (about a tenth of the raw server's time in profiles).
 */
export function writeUnaryAnswer(
  answer: UnaryAnswer,
  req: NodeRequest,
  res: NodeResponse | undefined,
  rewrite: ((req: NodeRequest, body: Uint8Array) => Uint8Array) | undefined,
  common: http.OutgoingHttpHeaders | undefined,
): void {
  if (gone(req)) return;
  try {
    const { header, trailer } = answer;
    let body = answer.body;
    if (answer.status >= 400 && rewrite && !answer.final) {
      body = rewrite(req, body);
      header["content-length"] = body.byteLength;
    }
    if (res === undefined || (answer.plain && "stream" in req && !res.headersSent)) {
      // Nothing else sets headers on the response of a unary call: these are all of them.
      const { stream } = req as StreamRequest | http2.Http2ServerRequest;
      // `common` is this request's own object (see `responseHeaders`): no copy of it.
      const all: http2.OutgoingHttpHeaders = common ?? {};
      for (const k in header) all[k] = header[k];
      all[":status"] = answer.status;
      // Last, where node:http2 would add it (see answer-date.ts); one the call set is kept.
      all.date ??= answerDate();
      if (res === undefined) {
        (stream as TrailingStream)[kTrailer] = trailer;
        stream.on("wantTrailers", sendTrailer);
      }
      // The compatibility layer's own "wantTrailers" listener sends what addTrailers set.
      else if (trailer) (res as http2.Http2ServerResponse).addTrailers(trailer);
      stream.respond(all, RESPOND_OPTIONS);
      stream.end(body.byteLength > 0 ? body : undefined);
      return;
    }
    const out = res as http2.Http2ServerResponse;
    setHeaders(res, common);
    out.writeHead(answer.status, header);
    if (trailer) out.addTrailers(trailer);
    if (body.byteLength > 0) out.end(body);
    else out.end();
  } catch {
    destroy(req, res);
  }
}

/** `respond`'s options for every unary answer: one object for all (Node copies it before use). */
const RESPOND_OPTIONS: http2.ServerStreamResponseOptions = Object.freeze({ waitForTrailers: true });

/** The trailers of a unary answer written onto a StreamRequest's stream, for `sendTrailer`. */
const kTrailer = Symbol("tessera.trailer");
type TrailingStream = http2.ServerHttp2Stream & { [kTrailer]?: http.OutgoingHttpHeaders };
const NO_TRAILERS: http.OutgoingHttpHeaders = Object.freeze({});

/** "wantTrailers" listener of a StreamRequest's stream (one function for all, no closure per call). */
function sendTrailer(this: TrailingStream): void {
  this.sendTrailers(this[kTrailer] ?? NO_TRAILERS);
}

/** The protocol of a streaming call, by its content type. */
export function streamProtocol(
  req: http.IncomingMessage | http2.Http2ServerRequest,
): "connect" | "grpc" | "grpc-web" {
  const type = req.headers["content-type"] ?? "";
  return type.startsWith("application/grpc-web")
    ? "grpc-web"
    : type.startsWith("application/grpc")
      ? "grpc"
      : "connect";
}

/**
 * Refuse a streaming call with `error` in its protocol, as Connect's handlers write a
 * stream's error: gRPC and gRPC-Web as a trailers-only answer (grpc-status-details-bin
 * holding its details, its metadata beside), Connect's streaming protocol as an end-stream
 * message (its spec puts a stream's error there, with HTTP 200, and the metadata with it).
 * With `limit`, the body left unread is stopped once answered (stopUnreadPlainBody): a
 * refused call whose client never ends its request kept its stream, and what refusing it
 * was to free, until server.requestTimeoutSeconds.
 */
export function refuseStream(
  req: http.IncomingMessage | http2.Http2ServerRequest,
  res: NodeResponse,
  error: ConnectError,
  limit?: number,
): void {
  const type = req.headers["content-type"] ?? "";
  res.statusCode = 200;
  if (limit !== undefined) stopUnreadPlainBody(req, res, limit);
  if (type.startsWith("application/grpc")) {
    res.setHeader("content-type", type);
    setHeaders(res, nodeHeaders(setTrailerStatus(new Headers(), error)));
    res.end();
    return;
  }
  const end = Buffer.from(JSON.stringify(endStreamToJson(new Headers(), error, {})));
  const head = Buffer.alloc(5);
  head[0] = endStreamFlag;
  head.writeUInt32BE(end.byteLength, 1);
  res.setHeader("content-type", type.startsWith("application/connect+") ? type : "application/connect+json");
  res.end(Buffer.concat([head, end]));
}
