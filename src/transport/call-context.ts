/**
 * The handler context of a unary call (`UnaryCall`) and the request, response and context
 * objects its interceptors and implementation see: values unary-call.ts makes and reads,
 * whose signal and headers are made only when read.
 */
import type { OutgoingHttpHeaders } from "node:http";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createContextValues,
  type HandlerContext,
  type UnaryRequest as InterceptedRequest,
  type UnaryResponse as InterceptedResponse,
} from "@connectrpc/connect";
import { getAbortSignalReason } from "@connectrpc/connect/protocol";
import { MAX_DEADLINE_MS } from "./deadlines.js";
import type { UnaryProtocol, UnaryRequest, UnarySpec } from "./unary-core.js";

/**
 * The handler context of a unary call: what Connect's `createHandlerContext` gives the
 * interceptors and the implementation (the same members, and a real AbortSignal that
 * aborts when the client goes away, when the deadline passes, on shutdown, and when the
 * call ends), built with less, and how the call ends it (`abort`, as Connect's
 * `HandlerContextController`).
 *
 * Connect's makes two AbortControllers per call (one for a deadline even when there is
 * none) linked by listeners on both, copies the request headers and makes the response
 * headers and trailers. Here a timer runs only for a deadline, and what a call rarely
 * uses is made when first read: the request's Headers (by the adapter, for this call
 * alone), the response headers and trailers (see `responseHeader`), and the AbortSignal.
 * Node's AbortSignal is an EventTarget whose making, linking and aborting were a visible
 * share of a unary call in CPU profiles, and no interceptor or implementation of Tessera's unary
 * RPCs reads it. Until it is read, the first reason the call was aborted with (the
 * request's or the shutdown signal's, the deadline's, the call's end) is kept, and a
 * signal made later starts in that state; test/unary-handlers.test.ts checks this against
 * Connect's, read during and after the call.
 *
 * A class, with getters on its prototype: an object literal with a getter gets a hidden
 * class of its own each time, which under load doubled the time of young generation GCs
 * (seen with `--trace-gc`).
 */
export class UnaryCall implements HandlerContext {
  readonly service: HandlerContext["service"];
  readonly requestMethod: string;
  readonly values: HandlerContext["values"];
  readonly url: string;
  readonly timeoutMs: () => number | undefined;
  #controller: AbortController | undefined;
  /** Why the call was aborted, while no signal exists yet. */
  #early: { reason: unknown } | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #onAbort: ((this: AbortSignal) => void) | undefined;
  #responseHeader: Headers | undefined;
  #responseTrailer: Headers | undefined;
  /** What `addResponseHeaders` set while no Headers is made, the caller's object as it was given: its names and values plain. */
  #added: Readonly<Record<string, HeaderValue>> | undefined;

  /**
   * `initialHeader` and `initialTrailer` are what the protocol's handler sets before the
   * call (content type, status "0"...): the response headers and trailers start with them.
   */
  constructor(
    readonly method: UnarySpec["method"],
    readonly protocolName: UnaryProtocol,
    private readonly request: UnaryRequest,
    private readonly shutdownSignal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    private readonly initialHeader: Readonly<Record<string, string>>,
    private readonly initialTrailer: Readonly<Record<string, string>> | undefined,
  ) {
    this.service = method.parent;
    this.requestMethod = request.method;
    this.values = request.contextValues ?? createContextValues();
    this.url = request.url;
    if (timeoutMs === undefined) {
      this.timeoutMs = noDeadline;
      return;
    }
    // Past a timer's longest delay, held to it: a longer timer fires after 1 ms (deadlines.ts).
    const bounded = Math.min(timeoutMs, MAX_DEADLINE_MS);
    const deadline = Date.now() + bounded;
    this.timeoutMs = () => deadline - Date.now();
    const expire = () => this.abort(new ConnectError("the operation timed out", Code.DeadlineExceeded));
    if (bounded <= 0) expire();
    else this.#timer = setTimeout(expire, bounded);
  }

  /**
   * The response headers and trailers, made when first read. Until then they hold only
   * their initial values (`responseTouched` is false), and the handlers write those
   * without making fetch Headers at all.
   */
  get responseHeader(): Headers {
    if (this.#responseHeader === undefined) {
      const header = new Headers(this.initialHeader);
      const added = this.#added;
      if (added !== undefined) for (const key in added) header.set(key, String(added[key]));
      this.#responseHeader = header;
    }
    return this.#responseHeader;
  }

  /**
   * Set response headers (as `responseHeader.set` each, in order, a number as its text)
   * without making the fetch Headers when every name is lowercase and every value is what
   * Headers would keep as it is (see `allPlain`): the rate-limit headers of every admitted
   * call. `values` is then kept as it is, not copied: the caller gives it away. Anything
   * else, a second set, or once the Headers exist, goes through them.
   */
  addResponseHeaders(values: Readonly<Record<string, HeaderValue>>): void {
    if (this.#responseHeader === undefined && this.#added === undefined && allPlain(values)) {
      this.#added = values;
      return;
    }
    const header = this.responseHeader;
    for (const key in values) header.set(key, String(values[key]));
  }

  /**
   * The response headers of an untouched call (`responseTouched` false) as Node takes them
   * (a new object, for the answer to add to): the protocol's, then what `addResponseHeaders`
   * set. Not in the order Headers would give them (sorted): HTTP/2 and HTTP/1.1 give the
   * order of different header names no meaning.
   */
  plainResponseHeader(): OutgoingHttpHeaders {
    const header: OutgoingHttpHeaders = {};
    const initial = this.initialHeader;
    for (const key in initial) header[key] = initial[key];
    const added = this.#added;
    if (added !== undefined) for (const key in added) header[key] = added[key];
    return header;
  }

  get responseTrailer(): Headers {
    if (this.#responseTrailer === undefined) this.#responseTrailer = new Headers(this.initialTrailer);
    return this.#responseTrailer;
  }

  get responseTouched(): boolean {
    return this.#responseHeader !== undefined || this.#responseTrailer !== undefined;
  }

  /** Whether the response trailers were read or changed (else they hold only their initial values). */
  get trailerTouched(): boolean {
    return this.#responseTrailer !== undefined;
  }

  /** The request's headers, made by the adapter when first read (see `UnaryRequest`). */
  get requestHeader(): Headers {
    return this.request.header;
  }

  get signal(): AbortSignal {
    if (this.#controller !== undefined) return this.#controller.signal;
    const controller = new AbortController();
    this.#controller = controller;
    const aborted = this.#early ?? this.#linkedAbort();
    if (aborted !== undefined) {
      controller.abort(aborted.reason);
    } else {
      const call = this;
      this.#onAbort = function onAbort(this: AbortSignal) {
        call.abort(getAbortSignalReason(this));
      };
      this.request.signal.addEventListener("abort", this.#onAbort);
      this.shutdownSignal?.addEventListener("abort", this.#onAbort);
    }
    return controller.signal;
  }

  /** Abort the call's signal (the first reason stays); the call ends with `abort(CALL_DONE)`. */
  abort = (reason?: unknown): void => {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    const controller = this.#controller;
    if (controller === undefined) {
      // A linked signal that aborted first gives the reason, as its listener would have.
      this.#early ??= this.#linkedAbort() ?? { reason };
      return;
    }
    if (this.#onAbort !== undefined) {
      this.request.signal.removeEventListener("abort", this.#onAbort);
      this.shutdownSignal?.removeEventListener("abort", this.#onAbort);
      this.#onAbort = undefined;
    }
    if (!controller.signal.aborted) controller.abort(reason);
  };

  #linkedAbort(): { reason: unknown } | undefined {
    if (this.request.signal.aborted) return { reason: getAbortSignalReason(this.request.signal) };
    if (this.shutdownSignal?.aborted) return { reason: getAbortSignalReason(this.shutdownSignal) };
    return undefined;
  }
}

const noDeadline = () => undefined;

/** A response header's value as `addResponseHeaders` takes it: text, or a number standing for its text. */
export type HeaderValue = string | number;

/** A lowercase header name (a token), and a value of visible ASCII: what Headers keeps unchanged and never refuses. */
const PLAIN_NAME = /^[a-z0-9-]+$/;
const PLAIN_VALUE = /^[!-~]+$/;
/** Names found plain, the first few: the same few are set on every call. */
const plainNames = new Set<string>();

/**
 * Whether Headers would keep every name and value of `values` as it is: a plain name (not
 * set-cookie, a list in Node's form), and a value of visible ASCII or a number (whose text,
 * digits, a sign, a point or a word, always is).
 */
function allPlain(values: Readonly<Record<string, HeaderValue>>): boolean {
  for (const key in values) {
    const value = values[key];
    if (typeof value === "number") {
      if (!plainName(key)) return false;
    } else if (typeof value !== "string" || !plainName(key) || !PLAIN_VALUE.test(value)) return false;
  }
  return true;
}

function plainName(key: string): boolean {
  if (plainNames.has(key)) return true;
  if (key === "set-cookie" || !PLAIN_NAME.test(key)) return false;
  if (plainNames.size < 32) plainNames.add(key);
  return true;
}

/** What the request and the response the interceptors see share: the call's method and service, and one message. */
abstract class CallMessage {
  readonly stream = false;
  readonly method: UnarySpec["method"];
  readonly service: HandlerContext["service"];

  constructor(
    protected readonly call: UnaryCall,
    readonly message: MessageShape<DescMessage>,
  ) {
    this.method = call.method;
    this.service = call.service;
  }
}

/** The implementation's response as the interceptors see it (Connect's `UnaryResponse`), its `header` and `trailer` the call's, made when read. */
export class CallResponse extends CallMessage implements InterceptedResponse {
  /** Set response headers as `header.set` would, without making the Headers when it need not (see `UnaryCall.addResponseHeaders`). */
  addHeaders(values: Readonly<Record<string, HeaderValue>>): void {
    this.call.addResponseHeaders(values);
  }

  get header(): Headers {
    return this.call.responseHeader;
  }

  get trailer(): Headers {
    return this.call.responseTrailer;
  }
}

/** The request the interceptors see (Connect's `UnaryRequest`), its `header` and `signal` the call's, made when read. */
export class CallRequest extends CallMessage implements InterceptedRequest {
  readonly requestMethod: string;
  readonly url: string;
  readonly contextValues: HandlerContext["values"];

  constructor(call: UnaryCall, message: MessageShape<DescMessage>) {
    super(call, message);
    this.requestMethod = call.requestMethod;
    this.url = call.url;
    this.contextValues = call.values;
  }

  get header(): Headers {
    return this.call.requestHeader;
  }

  get signal(): AbortSignal {
    return this.call.signal;
  }
}

/**
 * The implementation's context: the call's (response headers and trailers through getters,
 * made when first read), with the service, headers, signal and values of the request the
 * interceptors passed on (Connect's `mergeRequest`). An interceptor that passed on a copy
 * of the request (`{ ...req }`) dropped the getters `header` and `signal`; the call's
 * own, which they were, stand in.
 */
export class ImplementationContext implements HandlerContext {
  readonly method: UnarySpec["method"];
  readonly service: HandlerContext["service"];
  readonly timeoutMs: () => number | undefined;
  readonly requestMethod: string;
  readonly protocolName: string;
  readonly values: HandlerContext["values"];
  readonly url: string;
  readonly abort: (reason?: unknown) => void;
  #call: UnaryCall;
  #request: InterceptedRequest;

  constructor(call: UnaryCall, req: InterceptedRequest) {
    this.#call = call;
    this.#request = req;
    this.method = call.method;
    this.service = req.service;
    this.timeoutMs = call.timeoutMs;
    this.requestMethod = call.requestMethod;
    this.protocolName = call.protocolName;
    this.values = req.contextValues;
    this.url = call.url;
    this.abort = call.abort;
  }

  get requestHeader(): Headers {
    return (this.#request.header as Headers | undefined) ?? this.#call.requestHeader;
  }

  get responseHeader(): Headers {
    return this.#call.responseHeader;
  }

  get responseTrailer(): Headers {
    return this.#call.responseTrailer;
  }

  get signal(): AbortSignal {
    return (this.#request.signal as AbortSignal | undefined) ?? this.#call.signal;
  }
}

/** Replace the headers of `to` with those of `from` (nothing to do when they are the same object). */
export function copyHeaders(from: Headers, to: Headers): void {
  if (from === to) return;
  for (const key of [...to.keys()]) to.delete(key);
  from.forEach((value, key) => {
    to.set(key, value);
  });
}

/**
 * Set `values` on the response headers of `res` (as `res.header.set` each, in order): on a
 * response of this transport's unary calls without making fetch Headers when it need not
 * (see `UnaryCall.addResponseHeaders`), on any other through its `header`.
 */
export function setResponseHeaders(
  res: { readonly header: Headers },
  values: Readonly<Record<string, HeaderValue>>,
): void {
  if (res instanceof CallResponse) res.addHeaders(values);
  else for (const key in values) res.header.set(key, String(values[key]));
}
