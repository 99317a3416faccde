import type * as http from "node:http";
import type { Readable } from "node:stream";
import { Code, ConnectError, type ContextValues } from "@connectrpc/connect";
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

/**
 * A request body that can also be read whole: {@link WholeBody.readAll} is Connect's
 * `readAllBytes` (the same checks, errors and order) with one promise for the whole body,
 * where reading it through the iterator made a promise and a result object per chunk, and
 * `readAllBytes`'s `for await` helpers several more (a tenth of a Connect JSON call's heap
 * allocation).
 */
export interface WholeBody extends AsyncIterable<Uint8Array> {
  readAll(readMaxBytes: number, lengthHint: string | null): Promise<Uint8Array>;
  /**
   * Hand each chunk to `take` as it comes, synchronously; settles when the body ended. When
   * `take` throws, or the body fails, the rest is not read (as the iterator's `return`) and
   * the promise rejects with that error.
   */
  readChunks(take: (chunk: Uint8Array) => void): Promise<void>;
}

export function isWholeBody(body: unknown): body is WholeBody {
  return typeof (body as Partial<WholeBody>).readAll === "function";
}

/**
 * The request body as an async iterable fed by "data" events: one promise per chunk
 * the consumer waits for, none for chunks already queued. The request is paused while
 * more than a few chunks wait, so a slow consumer applies backpressure.
 */
export function bodyOf(req: Readable, errors: boolean, maxBytes: number): WholeBody {
  const queue: Uint8Array[] = [];
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
  onCappedData(
    req,
    maxBytes,
    (chunk) => {
      if (stopped) return;
      queue.push(chunk);
      if (queue.length > 8) req.pause();
      notify();
    },
    () => {
      if (stopped) return;
      stopped = true;
      queue.length = 0;
      if (!http2) req.pause();
      failure ??= new ConnectError(`request body larger than ${maxBytes} bytes`, Code.ResourceExhausted);
      notify();
    },
  );
  // "on", not "once": each fires once, and "once" wraps every listener in one more closure.
  req.on("end", () => {
    ended = true;
    notify();
  });
  if (errors)
    req.on("error", (err) => {
      // An HTTP/1.1 client that hung up mid-body ("aborted", ECONNRESET) ended the call itself,
      // as on "close" below: Canceled, not an Internal error logged as Tessera's fault.
      const gone = !(err instanceof ConnectError) && (err as NodeJS.ErrnoException).code === "ECONNRESET";
      failure = gone
        ? new ConnectError("the client closed the request", Code.Canceled, undefined, undefined, err)
        : err;
      notify();
    });
  req.on("close", () => {
    // Closed before its end: the client went away mid-body.
    if (!ended && failure === undefined) {
      failure = new ConnectError("the client closed the request", Code.Canceled);
      notify();
    }
  });
  /** The consumer stopped reading: the rest of the body is not read (stopUnreadBody). */
  const stop = () => {
    stopped = true;
    queue.length = 0;
    if (!ended) req.pause();
  };
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
          stop();
          return { done: true, value: undefined };
        },
      };
    },
    readAll(readMaxBytes, lengthHint) {
      // A length hint is used when it is a safe non-negative integer, as Connect's parseLengthHint.
      const hint = lengthHint === null ? Number.NaN : Number.parseInt(lengthHint, 10);
      const hinted = Number.isSafeInteger(hint) && hint >= 0;
      return new Promise<Uint8Array>((resolve, reject) => {
        if (hinted && hint > readMaxBytes) {
          reject(
            new ConnectError(
              `message size ${hint} is larger than configured readMaxBytes ${readMaxBytes}`,
              Code.ResourceExhausted,
            ),
          );
          return;
        }
        const chunks: Uint8Array[] = [];
        let count = 0;
        /** The whole body once it ended, undefined while more is to come; throws what the read fails with. */
        const step = (): Uint8Array | undefined => {
          for (;;) {
            if (stopped && failure !== undefined) throw failure;
            const chunk = queue.shift();
            if (chunk !== undefined) {
              if (queue.length === 0 && req.isPaused()) req.resume();
              count += chunk.byteLength;
              // A check failed on a chunk: readAllBytes stops the iteration (return), as on no other failure.
              if (hinted ? count > hint : count > readMaxBytes) {
                stop();
                throw hinted
                  ? new ConnectError(
                      `protocol error: promised ${hint} bytes, received ${count}`,
                      Code.InvalidArgument,
                    )
                  : new ConnectError(
                      `message size is larger than configured readMaxBytes ${readMaxBytes}`,
                      Code.ResourceExhausted,
                    );
              }
              chunks.push(chunk);
              continue;
            }
            if (failure !== undefined) throw failure;
            if (!ended) return undefined;
            if (hinted && count < hint)
              throw new ConnectError(
                `protocol error: promised ${hint} bytes, received ${count}`,
                Code.InvalidArgument,
              );
            // A copy, as readAllBytes makes: the parsed message may keep views of it.
            const all = new Uint8Array(count);
            let at = 0;
            for (const c of chunks) {
              all.set(c, at);
              at += c.byteLength;
            }
            return all;
          }
        };
        const pump = (): void => {
          let all: Uint8Array | undefined;
          try {
            all = step();
          } catch (err) {
            reject(err);
            return;
          }
          if (all === undefined) wake = pump;
          else resolve(all);
        };
        pump();
      });
    },
    readChunks(take) {
      return new Promise<void>((resolve, reject) => {
        const pump = (): void => {
          try {
            for (;;) {
              if (stopped && failure !== undefined) throw failure;
              const chunk = queue.shift();
              if (chunk !== undefined) {
                if (queue.length === 0 && req.isPaused()) req.resume();
                take(chunk);
                continue;
              }
              if (failure !== undefined) throw failure;
              if (ended) break;
              wake = pump;
              return;
            }
          } catch (err) {
            stop();
            reject(err);
            return;
          }
          resolve();
        };
        pump();
      });
    },
  };
}

/**
 * Hand `req`'s body to `onChunk` chunk by chunk until more than `maxBytes` have come; then
 * call `onOver` once, and drop what still arrives. The one size cap of a request body read
 * from "data" events: the RPC bodies above, and the OAuth endpoints' forms (oauth/form.ts).
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
