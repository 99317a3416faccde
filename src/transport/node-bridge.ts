import type * as http from "node:http";
import type * as http2 from "node:http2";
import type { Readable } from "node:stream";
import { Code, ConnectError, type ContextValues } from "@connectrpc/connect";
import type { UniversalServerResponse } from "@connectrpc/connect/protocol";
import { codeFromHttpStatus, codeFromString } from "@connectrpc/connect/protocol-connect";
import type { NodeRequest, NodeResponse } from "./stream-server.js";
import { nodeHeaders, type UnaryProtocol, type UnaryRequest } from "./unary-protocols.js";

/**
 * The bridge between Node's request and response and Connect's universal ones, for the
 * fast adapter: the request (its signal, headers, body) and the writers of what Connect's
 * handlers answer, with the code each call ended with (for `onCallEnd`).
 */

/**
 * The request as Connect's handlers and the unary handlers see it. Its `header` (fetch
 * Headers) is made from Node's headers when first read: the unary handlers read what they
 * need from `nodeHeaders`, so a call whose interceptors and implementation never read
 * `header` never makes it (see `UnaryRequest`).
 */
export class AdapterRequest implements UnaryRequest {
  #header: Headers | undefined;

  constructor(
    readonly httpVersion: string,
    readonly method: string,
    readonly url: string,
    readonly nodeHeaders: http.IncomingHttpHeaders,
    readonly body: AsyncIterable<Uint8Array>,
    readonly signal: AbortSignal,
    readonly contextValues: ContextValues | undefined,
  ) {}

  get header(): Headers {
    if (this.#header === undefined) this.#header = webHeaders(this.nodeHeaders);
    return this.#header;
  }
}

type AbortListener = (this: RequestSignal, event: Event) => void;

/**
 * The request's abort signal as Connect's protocol handlers use it: they only link it
 * into the handler context's own AbortController (createLinkedAbortController reads
 * `aborted` and `reason` and adds and removes one "abort" listener); handlers see that
 * controller's real AbortSignal, never this object.
 *
 * Why not an AbortController: a DOM AbortSignal is an EventTarget, and making one, adding
 * and removing a listener cost a few percent of a unary call in profiles, for a signal
 * that almost never fires. This one is a plain object with the same observable behaviour
 * for that use: it fires its listeners once, with an "abort" Event, when the client goes
 * away (test/connect-adapter.test.ts checks that handlers still see cancellation).
 */
export class RequestSignal {
  aborted = false;
  reason: unknown = undefined;
  onabort: AbortListener | null = null;
  private listeners: AbortListener[] | undefined;

  addEventListener(type: string, listener: AbortListener): void {
    if (type !== "abort" || this.aborted) return;
    if (this.listeners) this.listeners.push(listener);
    else this.listeners = [listener];
  }

  removeEventListener(type: string, listener: AbortListener): void {
    if (type !== "abort" || !this.listeners) return;
    const i = this.listeners.indexOf(listener);
    if (i >= 0) this.listeners.splice(i, 1);
  }

  throwIfAborted(): void {
    if (this.aborted) throw this.reason;
  }

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    const listeners = this.listeners ?? [];
    this.listeners = undefined;
    const event = new Event("abort");
    for (const listener of listeners) listener.call(this, event);
    this.onabort?.call(this, event);
  }
}

/** HTTP/2 error codes by name, as connect-node names them in its reasons. */
const H2_CODES = [
  "NO_ERROR",
  "PROTOCOL_ERROR",
  "INTERNAL_ERROR",
  "FLOW_CONTROL_ERROR",
  "SETTINGS_TIMEOUT",
  "STREAM_CLOSED",
  "FRAME_SIZE_ERROR",
  "REFUSED_STREAM",
  "CANCEL",
  "COMPRESSION_ERROR",
  "CONNECT_ERROR",
  "ENHANCE_YOUR_CALM",
  "INADEQUATE_SECURITY",
  "HTTP_1_1_REQUIRED",
] as const;

/** Connect codes of the HTTP/2 reset codes connect-node maps (its `connectErrorFromH2ResetCode`). */
const RESET_CODES: Readonly<Record<number, Code>> = {
  1: Code.Internal,
  2: Code.Internal,
  3: Code.Internal,
  4: Code.Internal,
  6: Code.Internal,
  9: Code.Internal,
  10: Code.Internal,
  7: Code.Unavailable,
  8: Code.Canceled,
  11: Code.ResourceExhausted,
  12: Code.PermissionDenied,
  13: Code.PermissionDenied,
};

/**
 * Why the request ended early, as connect-node reports it: the same code and message for
 * each HTTP/2 reset code it maps (connect-node's `connectErrorFromH2ResetCode`, not exported
 * by the package, hence the copy). connect-node aborts with no reason for the rest (NO_ERROR,
 * STREAM_CLOSED, unknown codes, HTTP/1.1), which handlers read as Canceled (an AbortError):
 * here a Canceled ConnectError, without the DOMException and stack trace an AbortError costs.
 */
export function closeReason(req: NodeRequest): ConnectError {
  const rstCode = "stream" in req ? req.stream.rstCode : undefined;
  const code = rstCode === undefined ? undefined : RESET_CODES[rstCode];
  if (code === undefined) return new ConnectError("the client closed the request", Code.Canceled);
  return new ConnectError(
    `http/2 stream closed with error code ${H2_CODES[rstCode!]} (0x${rstCode!.toString(16)})`,
    code,
  );
}

/** Node's incoming headers as fetch Headers, without HTTP/2 pseudo-headers. */
export function webHeaders(nodeHeaders: http.IncomingHttpHeaders): Headers {
  const header = new Headers();
  for (const k in nodeHeaders) {
    if (k.charCodeAt(0) === 58 /* ":" */) continue;
    const v = nodeHeaders[k];
    if (v === undefined) continue;
    if (typeof v === "string") header.append(k, v);
    else for (const e of v) header.append(k, e);
  }
  return header;
}

/** Optional fetch Headers as a Node header object. */
function nodeHeadersOf(header: Headers | undefined): http.OutgoingHttpHeaders | undefined {
  return header === undefined ? undefined : nodeHeaders(header);
}

/**
 * The request body as an async iterable fed by "data" events: one promise per chunk
 * the consumer waits for, none for chunks already queued. The request is paused while
 * more than a few chunks wait, so a slow consumer applies backpressure.
 */
export function bodyOf(req: Readable, errors: boolean, maxBytes: number): AsyncIterable<Uint8Array> {
  const queue: Uint8Array[] = [];
  let received = 0;
  // Set once the body is no longer read (too large, or the handler stopped): what still
  // arrives is dropped, and the request stays paused for the adapter to stop (stopUnreadBody).
  // Not an HTTP/2 one: a paused stream with data pending pauses its whole session's reads,
  // so the connection was held (and counted against its address) even after the client
  // left; it flows, dropped, until the adapter resets it.
  let stopped = false;
  const http2 = "session" in req || "stream" in req;
  // A StreamRequest's stream whose empty last DATA frame arrived while admission was
  // pending has emitted "end" already, read by nobody (Node reads an HTTP/2 stream that
  // ended with no data to its end at once). "end" comes only once the buffer is empty,
  // so no data went unseen.
  let ended = req.readableEnded;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  req.on("data", (chunk: Buffer) => {
    if (stopped) return;
    received += chunk.byteLength;
    if (received > maxBytes) {
      stopped = true;
      queue.length = 0;
      if (!http2) req.pause();
      failure ??= new ConnectError(`request body larger than ${maxBytes} bytes`, Code.ResourceExhausted);
      notify();
      return;
    }
    queue.push(chunk);
    if (queue.length > 8) req.pause();
    notify();
  });
  // "on", not "once": each fires once, and "once" wraps every listener in one more closure.
  req.on("end", () => {
    ended = true;
    notify();
  });
  if (errors)
    req.on("error", (err) => {
      failure = err;
      notify();
    });
  req.on("close", () => {
    // Closed before its end: the client went away mid-body.
    if (!ended && failure === undefined) {
      failure = new ConnectError("the client closed the request", Code.Canceled);
      notify();
    }
  });
  return {
    [Symbol.asyncIterator]() {
      return {
        async next(): Promise<IteratorResult<Uint8Array>> {
          for (;;) {
            if (stopped && failure !== undefined) throw failure;
            const chunk = queue.shift();
            if (chunk !== undefined) {
              if (queue.length === 0 && req.isPaused()) req.resume();
              return { done: false, value: chunk };
            }
            if (failure !== undefined) throw failure;
            if (ended) return { done: true, value: undefined };
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
          }
        },
        async return(): Promise<IteratorResult<Uint8Array>> {
          // The handler stopped reading: the rest of the body is not read (stopUnreadBody).
          stopped = true;
          queue.length = 0;
          if (!ended) req.pause();
          return { done: true, value: undefined };
        },
      };
    },
  };
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

/** The code of a Connect unary error body (`{"code":"not_found",…}`), else the HTTP status's. */
export function connectErrorCode(body: Uint8Array, status: number): number {
  try {
    const code = (JSON.parse(Buffer.from(body).toString("utf8")) as { code?: unknown }).code;
    const parsed = typeof code === "string" ? codeFromString(code) : undefined;
    if (parsed !== undefined) return parsed;
  } catch {
    // Not JSON: the status tells.
  }
  return codeFromHttpStatus(status);
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
  return uRes.status < 400 ? 0 : codeFromHttpStatus(uRes.status);
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

function drained(res: NodeResponse): Promise<void> {
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
