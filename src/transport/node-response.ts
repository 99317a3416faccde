import type * as http from "node:http";
import type * as http2 from "node:http2";
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalServerResponse } from "@connectrpc/connect/protocol";
import { codeFromHttpStatus, codeFromString } from "@connectrpc/connect/protocol-connect";
import type { NodeRequest, NodeResponse } from "./stream-server.js";
import { nodeHeaders, type UnaryProtocol } from "./unary-protocols.js";

/**
 * The response side of the fast adapter's bridge (node-bridge.ts has the request side): the
 * writers of what Connect's handlers answer (streams, Connect GET, gRPC-Web text, and any
 * call the unary handlers do not take) onto Node's response, with the code each call ended
 * with (for `onCallEnd`).
 */

/** Optional fetch Headers as a Node header object. */
function nodeHeadersOf(header: Headers | undefined): http.OutgoingHttpHeaders | undefined {
  return header === undefined ? undefined : nodeHeaders(header);
}

/**
 * Write a universal response: headers after the first body chunk (so handlers can still set
 * them), trailers last. Resolves to the code the call ended with (see {@link streamedCode}),
 * Canceled when the response could not be written to its end.
 */
export async function writeResponse(uRes: UniversalServerResponse, res: NodeResponse): Promise<number> {
  const it = uRes.body?.[Symbol.asyncIterator]();
  // The members used here have the same shape on HTTP/1.1's and HTTP/2's response.
  const out = res as http2.Http2ServerResponse;
  let writing = false;
  let done = it === undefined;
  let last: Uint8Array | undefined;
  try {
    if (it !== undefined) {
      let chunk = await it.next();
      writing = true;
      out.writeHead(uRes.status, nodeHeadersOf(uRes.header));
      for (; chunk.done !== true; chunk = await it.next()) {
        writing = true;
        last = chunk.value;
        if (!out.write(chunk.value)) await drained(res);
        writing = false;
      }
      done = true;
    }
    if (!out.headersSent) out.writeHead(uRes.status, nodeHeadersOf(uRes.header));
    const trailers = nodeHeadersOf(uRes.trailer);
    if (trailers) out.addTrailers(trailers);
    out.end();
    return streamedCode(uRes, last);
  } catch (err) {
    // Report write errors to the handler (it stops producing); then drop the response.
    if (writing) it?.throw?.(err).catch(() => undefined);
    res.destroy();
    return Code.Canceled;
  } finally {
    // Only a body left unfinished needs return() (an exhausted iterator has nothing to
    // release; Connect's gRPC pipeline would abort its context a second time).
    if (!done) it?.return?.().catch(() => undefined);
  }
}

/**
 * An error response (small, unary): read it whole, let `rewrite` change the body, send it
 * with its new length. Resolves to the error's code (Canceled when it could not be sent).
 */
export async function writeErrorResponse(
  uRes: UniversalServerResponse,
  req: NodeRequest,
  res: NodeResponse,
  rewrite: (req: NodeRequest, body: Uint8Array) => Uint8Array,
): Promise<number> {
  const out = res as http2.Http2ServerResponse;
  try {
    const chunks: Uint8Array[] = [];
    if (uRes.body) for await (const chunk of uRes.body) chunks.push(chunk);
    const original = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
    const code = connectErrorCode(original, uRes.status);
    const body = rewrite(req, original);
    const header = nodeHeadersOf(uRes.header) ?? {};
    header["content-length"] = body.byteLength;
    out.writeHead(uRes.status, header);
    const trailers = nodeHeadersOf(uRes.trailer);
    if (trailers) out.addTrailers(trailers);
    out.end(body);
    return code;
  } catch {
    res.destroy();
    return Code.Canceled;
  }
}

/** The protocol of a request Connect's handlers serve, by its content type (Connect GET has none). */
export function protocolOf(req: NodeRequest): UnaryProtocol {
  const type = req.headers["content-type"] ?? "";
  if (type.startsWith("application/grpc-web")) return "grpc-web";
  if (type.startsWith("application/grpc")) return "grpc";
  return "connect";
}

/**
 * The code, for metrics and the access log, of an answer that is only an HTTP status.
 * Connect's 405 (a GET or PUT of an RPC that takes only POST) and 415 (a content type no
 * protocol has) map to `unknown` by the protocols' table, which the access log reads as
 * an INTERNAL fault of ours that any client could then count up at will: they are a
 * request this server does not support, so `unimplemented`, as gRPC makes a 404.
 */
export function codeOfStatus(status: number): number {
  return status === 405 || status === 415 ? Code.Unimplemented : codeFromHttpStatus(status);
}

/** The code of a Connect unary error body (`{"code":"not_found",…}`), else the HTTP status's. */
export function connectErrorCode(body: Uint8Array, status: number): number {
  try {
    const code = (JSON.parse(Buffer.from(body).toString("utf8")) as { code?: unknown }).code;
    const parsed = typeof code === "string" ? codeFromString(code) : undefined;
    if (parsed !== undefined) return parsed;
  } catch {
    // Not JSON: the status tells.
  }
  return codeOfStatus(status);
}

/**
 * The code a response Connect's handlers wrote ended with, read from what was written
 * (only for calls those handlers serve: streams, Connect GET, gRPC-Web text, so never on
 * the unary hot path): gRPC's grpc-status trailer, gRPC-Web's trailer frame, the error of a
 * Connect stream's end message, or a Connect unary answer's status. `last` is the last
 * body chunk, where the two framed protocols put their status.
 */
export function streamedCode(uRes: UniversalServerResponse, last: Uint8Array | undefined): number {
  const grpcStatus = uRes.trailer?.get("grpc-status");
  if (grpcStatus != null) return Number(grpcStatus) || 0;
  const type = uRes.header?.get("content-type") ?? "";
  const frame = last !== undefined && last.byteLength >= 5 ? lastEnvelope(last) : undefined;
  if (type.startsWith("application/grpc-web")) {
    // The trailer frame (flag 0x80), "grpc-status: N" among its lines; -text bodies are base64.
    const text = type.includes("-text")
      ? Buffer.from(Buffer.from(last ?? EMPTY_BYTES).toString("latin1"), "base64").toString("latin1")
      : Buffer.from(frame?.data ?? EMPTY_BYTES).toString("latin1");
    const m = /grpc-status:\s*(\d+)/i.exec(text);
    return m ? Number(m[1]) : Code.Unknown;
  }
  if (type.startsWith("application/connect+")) {
    // The end-of-stream message (flag 0x02): {"error":{"code":…}} when the stream failed.
    if (frame === undefined || (frame.flags & 0b10) === 0) return Code.Unknown;
    try {
      const end = JSON.parse(Buffer.from(frame.data).toString("utf8")) as { error?: { code?: unknown } };
      if (end.error === undefined) return 0;
      return (
        (typeof end.error.code === "string" ? codeFromString(end.error.code) : undefined) ?? Code.Unknown
      );
    } catch {
      return Code.Unknown;
    }
  }
  return uRes.status < 400 ? 0 : codeOfStatus(uRes.status);
}

const EMPTY_BYTES = new Uint8Array(0);

/** The last complete envelope (flags, data) of a chunk holding whole envelopes, or undefined. */
function lastEnvelope(chunk: Uint8Array): { flags: number; data: Uint8Array } | undefined {
  let found: { flags: number; data: Uint8Array } | undefined;
  let at = 0;
  while (at + 5 <= chunk.byteLength) {
    const length = new DataView(chunk.buffer, chunk.byteOffset + at + 1, 4).getUint32(0);
    if (at + 5 + length > chunk.byteLength) return found;
    found = { flags: chunk[at]!, data: chunk.subarray(at + 5, at + 5 + length) };
    at += 5 + length;
  }
  return found;
}

/**
 * Until `res` can take more, or rejected once it cannot: its "close" event, or its having
 * closed already. A write to a closed response (the client reset the stream while the
 * handler awaited something) returns false, and no "close" is to come: waiting for one held
 * the handler's generator at its `yield` for ever, never finalised (a WatchRevocations
 * stream's slot was never released).
 */
function drained(res: NodeResponse): Promise<void> {
  const stream = (res as http2.Http2ServerResponse).stream as http2.ServerHttp2Stream | undefined;
  if (stream !== undefined ? stream.destroyed : (res as http.ServerResponse).destroyed)
    return Promise.reject(new ConnectError("the client closed the request", Code.Canceled));
  return new Promise((resolve, reject) => {
    const onDrain = () => {
      res.off("close", onClose);
      resolve();
    };
    const onClose = () => {
      res.off("drain", onDrain);
      reject(new ConnectError("the client closed the request", Code.Canceled));
    };
    res.once("drain", onDrain);
    res.once("close", onClose);
  });
}
