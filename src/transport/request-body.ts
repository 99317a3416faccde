import type { Readable } from "node:stream";
import { Code, ConnectError } from "@connectrpc/connect";

/**
 * The body of a request the fast adapter serves, read from the request's "data" events (the
 * request side of the bridge is node-bridge.ts).
 */

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
 * more than a few chunks wait, so a slow consumer applies backpressure. At most `maxBytes`
 * are taken: past them the body fails ResourceExhausted, and what still arrives is dropped.
 * `onClose`, when given, is called first when `req` closes, from the body's own "close"
 * listener: a caller watching the same stream's close needs no listener of its own (each
 * listener added to an HTTP/2 stream also runs its "newListener" event).
 */
export function bodyOf(req: Readable, errors: boolean, maxBytes: number, onClose?: () => void): WholeBody {
  return new NodeBody(req, errors, maxBytes, onClose);
}

const kBody = Symbol("tessera.body");
type BodySource = Readable & { [kBody]: NodeBody };

/**
 * The listeners of a body's request: one function each for every request, finding the body
 * on the request (a closure per listener and per call was a measurable share of a call's heap).
 */
function onBodyData(this: BodySource, chunk: Buffer): void {
  this[kBody].take(chunk);
}

// "on", not "once": each fires once, and "once" wraps every listener in one more closure.
function onBodyEnd(this: BodySource): void {
  const body = this[kBody];
  body.ended = true;
  body.notify();
}

function onBodyError(this: BodySource, err: unknown): void {
  const body = this[kBody];
  // An HTTP/1.1 client that hung up mid-body ("aborted", ECONNRESET) ended the call itself,
  // as on "close" below: Canceled, not an Internal error logged as Tessera's fault.
  const gone = !(err instanceof ConnectError) && (err as NodeJS.ErrnoException).code === "ECONNRESET";
  body.failure = gone
    ? new ConnectError("the client closed the request", Code.Canceled, undefined, undefined, err)
    : err;
  body.notify();
}

function onBodyClose(this: BodySource): void {
  const body = this[kBody];
  body.onClose?.();
  // Closed before its end: the client went away mid-body.
  if (!body.ended && body.failure === undefined) {
    body.failure = new ConnectError("the client closed the request", Code.Canceled);
    body.notify();
  }
}

class NodeBody implements WholeBody {
  readonly queue: Uint8Array[] = [];
  /**
   * Set once the body is no longer read (too large, or the handler stopped): what still
   * arrives is dropped, and the request stays paused for the adapter to stop (stopUnreadBody).
   * Not an HTTP/2 one: a paused stream with data pending pauses its whole session's reads,
   * so the connection was held (and counted against its address) even after the client
   * left; it flows, dropped, until the adapter resets it.
   */
  stopped = false;
  readonly http2: boolean;
  /**
   * A StreamRequest's stream whose empty last DATA frame arrived while admission was
   * pending has emitted "end" already, read by nobody (Node reads an HTTP/2 stream that
   * ended with no data to its end at once). "end" comes only once the buffer is empty,
   * so no data went unseen.
   */
  ended: boolean;
  failure: unknown = undefined;
  wake: (() => void) | undefined = undefined;
  received = 0;

  constructor(
    readonly req: Readable,
    errors: boolean,
    readonly maxBytes: number,
    readonly onClose: (() => void) | undefined,
  ) {
    this.http2 = "session" in req || "stream" in req;
    this.ended = req.readableEnded;
    (req as BodySource)[kBody] = this;
    req.on("data", onBodyData);
    req.on("end", onBodyEnd);
    if (errors) req.on("error", onBodyError);
    req.on("close", onBodyClose);
  }

  /** A chunk of the body, within `maxBytes` (the one size cap, as onCappedData's). */
  take(chunk: Buffer): void {
    if (this.stopped) return;
    this.received += chunk.byteLength;
    if (this.received > this.maxBytes) {
      this.stopped = true;
      this.queue.length = 0;
      if (!this.http2) this.req.pause();
      this.failure ??= new ConnectError(
        `request body larger than ${this.maxBytes} bytes`,
        Code.ResourceExhausted,
      );
      this.notify();
      return;
    }
    this.queue.push(chunk);
    if (this.queue.length > 8) this.req.pause();
    this.notify();
  }

  notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** The consumer stopped reading: the rest of the body is not read (stopUnreadBody). */
  stop(): void {
    this.stopped = true;
    this.queue.length = 0;
    if (!this.ended) this.req.pause();
  }

  /** The next queued chunk (the request resumed once none waits), or undefined. */
  shift(): Uint8Array | undefined {
    const chunk = this.queue.shift();
    if (chunk !== undefined && this.queue.length === 0 && this.req.isPaused()) this.req.resume();
    return chunk;
  }

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    const body = this;
    return {
      async next(): Promise<IteratorResult<Uint8Array>> {
        for (;;) {
          if (body.stopped && body.failure !== undefined) throw body.failure;
          const chunk = body.shift();
          if (chunk !== undefined) return { done: false, value: chunk };
          if (body.failure !== undefined) throw body.failure;
          if (body.ended) return { done: true, value: undefined };
          await new Promise<void>((resolve) => {
            body.wake = resolve;
          });
        }
      },
      async return(): Promise<IteratorResult<Uint8Array>> {
        body.stop();
        return { done: true, value: undefined };
      },
    };
  }

  readAll(readMaxBytes: number, lengthHint: string | null): Promise<Uint8Array> {
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
          if (this.stopped && this.failure !== undefined) throw this.failure;
          const chunk = this.shift();
          if (chunk !== undefined) {
            count += chunk.byteLength;
            // A check failed on a chunk: readAllBytes stops the iteration (return), as on no other failure.
            if (hinted ? count > hint : count > readMaxBytes) {
              this.stop();
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
          if (this.failure !== undefined) throw this.failure;
          if (!this.ended) return undefined;
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
        if (all === undefined) this.wake = pump;
        else resolve(all);
      };
      pump();
    });
  }

  readChunks(take: (chunk: Uint8Array) => void): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const pump = (): void => {
        try {
          for (;;) {
            if (this.stopped && this.failure !== undefined) throw this.failure;
            const chunk = this.shift();
            if (chunk !== undefined) {
              take(chunk);
              continue;
            }
            if (this.failure !== undefined) throw this.failure;
            if (this.ended) break;
            this.wake = pump;
            return;
          }
        } catch (err) {
          this.stop();
          reject(err);
          return;
        }
        resolve();
      };
      pump();
    });
  }
}
