import type * as http from "node:http";
import type { Readable } from "node:stream";
import { Code, ConnectError, type ContextValues } from "@connectrpc/connect";
import { repeatedAuthorization } from "../auth/repeated-authorization.js";
import type { NodeRequest } from "./stream-server.js";
import type { UnaryRequest } from "./unary-protocols.js";

/**
 * The bridge between Node's request and response and Connect's universal ones, for the
 * fast adapter: the request side here (the request, its signal, headers and body, and why it
 * ended early); the writers of what Connect's handlers answer are in node-response.ts.
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

/**
 * Make `req.headers` hold a repeated Authorization header as fetch Headers would ("a, b"), for
 * everything that reads it after (admission before the body, the Headers of the admission
 * interceptor, connect-node's adapter): Node kept only its first value. Joined, the repeat is
 * refused as a repeated X-API-Key is (auth/credentials.ts). The raw list is scanned only when
 * the header was sent.
 */
export function joinRepeatedAuthorization(req: {
  readonly headers: http.IncomingHttpHeaders;
  readonly rawHeaders: readonly string[];
}): void {
  if (req.headers.authorization === undefined) return;
  const joined = repeatedAuthorization(req.rawHeaders);
  if (joined !== undefined) req.headers.authorization = joined;
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

export { bodyOf, isWholeBody, type WholeBody } from "./request-body.js";

/**
 * Hand `req`'s body to `onChunk` chunk by chunk until more than `maxBytes` have come; then
 * call `onOver` once, and drop what still arrives. The one size cap of a request body read
 * from "data" events for the OAuth endpoints' forms (oauth/form.ts); request-body.ts applies
 * the same cap to the RPC bodies.
 */
export function onCappedData(
  req: Readable,
  maxBytes: number,
  onChunk: (chunk: Buffer) => void,
  onOver: () => void,
): void {
  let received = 0;
  let over = false;
  req.on("data", (chunk: Buffer) => {
    if (over) return;
    received += chunk.byteLength;
    if (received > maxBytes) {
      over = true;
      onOver();
      return;
    }
    onChunk(chunk);
  });
}
