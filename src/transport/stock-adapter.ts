import type * as http from "node:http";
import type * as http2 from "node:http2";
import type { DescMethod, DescMethodUnary } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextValues } from "@connectrpc/connect";
import { encodeEnvelope, type UniversalServerResponse } from "@connectrpc/connect/protocol";
import { codeToHttpStatus, errorFromJsonBytes, errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import { findTrailerError, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { trailerFlag, trailerParse, trailerSerialize } from "@connectrpc/connect/protocol-grpc-web";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { tesseraErrorInfo } from "../errors.js";
import { clientFaultOf } from "./client-faults.js";
import { setHeaders, stopUnreadBody } from "./early-answers.js";
import { internalErrorOf } from "./last-resort.js";
import { connectErrorCode, streamedCode } from "./node-response.js";
import type { ConnectHandlerOptions } from "./options.js";
import type { NodeResponse } from "./stream-server.js";
import { nodeHeaders, type RequestHeaders, type UnaryProtocol } from "./unary-protocols.js";

/**
 * `server.transport=connect`: calls past admission are served by connect-node's stock
 * `connectNodeAdapter` (its request and response bridge, its handlers for every protocol),
 * with what Tessera's own adapter adds around Connect given to it too, so both transports
 * answer every call the same way: the common headers (set before the adapter writes), the
 * body limit (`maxBodyBytes`, counted as connect-node reads the body), the reason and
 * request id on Connect's own InvalidArgument (`callError`), the JSON envelope of Connect
 * error bodies (`errorBody`), the call's end for metrics and the access log (`onCallEnd`),
 * and an unread body stopped once the answer is out. These are hooks on Node's request and
 * response objects (their async iterator, writeHead, write, addTrailers, end): connect-node
 * offers none of its own for them.
 */

/**
 * Serves one admitted call to an RPC path through the stock adapter, and reports its end
 * (`onCallEnd`) once it closes. When it throws, it reports nothing: the caller answers the
 * call and reports it (stream-server.ts).
 */
export type StockDispatch = (
  req: http.IncomingMessage | http2.Http2ServerRequest,
  res: NodeResponse,
  method: DescMethod,
  protocol: UnaryProtocol,
  common: http.OutgoingHttpHeaders | undefined,
) => void;

/** The stock adapter, on `options` as Tessera's own adapter has them (compression, limits, router options). */
export function createStockDispatch(options: ConnectHandlerOptions): StockDispatch {
  // The router options as Tessera's adapter has them (compression with client-fault
  // decompression, readMaxBytes, interceptors, JSON options); `onNotFound` is never reached
  // (only RPC paths come here).
  const { onNotFound: _onNotFound, contextValues, ...routerOptions } = options;
  const adapter = connectNodeAdapter({
    ...routerOptions,
    ...(contextValues ? { contextValues: (req) => contextValues(req) } : {}),
  });
  const { errorBody, callError, onCallEnd } = options;
  const readMaxBytes = options.readMaxBytes ?? 0xffffffff;
  const maxBodyBytes = options.maxBodyBytes ?? Number.POSITIVE_INFINITY;
  const jsonOptions = options.jsonOptions ?? {};

  /**
   * The error to answer with in place of one Connect raised itself, else undefined
   * (unchanged), or a promise of either: a request message that does not parse, or an
   * envelope flagged compressed without a negotiated encoding, is the client's fault
   * (connect-node says Internal; client-faults.ts), and every error without Tessera's
   * ErrorInfo (raised by Connect before or after the pipeline) goes through `callError`,
   * as on the fast transport.
   */
  function refined(
    req: http.IncomingMessage | http2.Http2ServerRequest,
    method: DescMethod,
    error: ConnectError,
  ): Maybe<ConnectError | undefined> {
    const own = clientFaultOf(error) ?? abandoned(req, error) ?? error;
    const unchanged = own === error ? undefined : own;
    if (callError === undefined || tesseraErrorInfo(own) !== undefined) return unchanged;
    const values = options.contextValues?.(req) ?? createContextValues();
    const fresh = new ConnectError(own.rawMessage, own.code);
    // The hook failing is answered as any call that fails outside the pipeline (last-resort.ts).
    const failed = (err: unknown) => internalErrorOf(options, req, method, err, "rpc call error failed");
    let answered: Maybe<ConnectError>;
    try {
      answered = callError(fresh, values, method as DescMethodUnary, headerSource(req));
      if (answered instanceof Promise) answered = answered.catch(failed);
    } catch (err) {
      answered = failed(err);
    }
    return then(answered, (answer) => (answer === fresh ? unchanged : answer));
  }

  /**
   * `error` as Canceled when it is connect-node's Internal for a request its client reset or
   * hung up on before its body was read: the client ended the call, nothing failed here, so it
   * is neither answered nor logged as Tessera's fault (which any caller could do at will).
   */
  function abandoned(req: http.IncomingMessage | http2.Http2ServerRequest, error: ConnectError) {
    if (error.code !== Code.Internal || !req.aborted) return undefined;
    return new ConnectError("the client ended the call before its request was read", Code.Canceled);
  }

  return (req, res, method, protocol, common) => {
    parseableAuthority(req);
    setHeaders(res, common);
    if (maxBodyBytes !== Number.POSITIVE_INFINITY) limitBody(req, maxBodyBytes);
    const out = res as http2.Http2ServerResponse;
    const unary = method.methodKind === "unary";
    // Called with `this` set, through loose types: each is Node's own, overloads and all.
    const writeHead = out.writeHead as (...a: unknown[]) => unknown;
    const write = out.write as (...a: unknown[]) => boolean;
    const end = out.end as (...a: unknown[]) => unknown;
    const addTrailers = out.addTrailers;
    let status = 200;
    let head: http.OutgoingHttpHeaders = {};
    let trailer: http.OutgoingHttpHeaders | undefined;
    let last: Uint8Array | undefined;
    /** The body of a Connect unary error, held until its end to be rewritten. */
    let held: Uint8Array[] | undefined;
    /** gRPC trailers or a gRPC-Web trailer frame being refined: written once they are, then the end. */
    let pending: Promise<void> | undefined;
    let code: number | undefined;
    const fail = () => out.destroy();
    const ended = () => stopUnreadBody(req, res, readMaxBytes);

    out.writeHead = ((s: number, headers?: http.OutgoingHttpHeaders) => {
      status = s;
      head = headers ?? {};
      if (unary && protocol === "connect" && s >= 400) {
        // connect-node calls writeHead again at the end when headersSent is still false.
        held ??= [];
        return out;
      }
      return writeHead.call(out, s, head);
    }) as typeof out.writeHead;
    out.write = ((chunk: Uint8Array, ...rest: unknown[]) => {
      if (held !== undefined) {
        held.push(chunk);
        const cb = rest.find((r) => typeof r === "function") as (() => void) | undefined;
        cb?.();
        return true;
      }
      if (unary && protocol === "grpc-web" && chunk[0] === trailerFlag) {
        const frame = grpcWebTrailer(chunk);
        if (frame instanceof Promise) {
          pending = frame.then((f) => {
            last = f;
            write.call(out, f);
          });
          const cb = rest.find((r) => typeof r === "function") as (() => void) | undefined;
          cb?.();
          return true;
        }
        chunk = frame;
      }
      last = chunk;
      return write.call(out, chunk, ...rest);
    }) as typeof out.write;
    out.addTrailers = (headers: http.OutgoingHttpHeaders) => {
      const refinedTrailer = unary && protocol === "grpc" ? grpcTrailers(headers) : headers;
      const add = (t: http.OutgoingHttpHeaders) => {
        trailer = t;
        addTrailers.call(out, t);
      };
      if (refinedTrailer instanceof Promise) pending = refinedTrailer.then(add);
      else add(refinedTrailer);
    };
    out.end = ((...args: unknown[]) => {
      if (held !== undefined) {
        const body = connectError(held.length === 1 ? held[0]! : Buffer.concat(held));
        held = undefined;
        const finish = (b: Uint8Array) => {
          writeHead.call(out, status, head);
          end.call(out, b);
          ended();
        };
        if (body instanceof Promise) body.then(finish, fail);
        else finish(body);
      } else if (pending !== undefined) {
        pending.then(() => {
          end.apply(out, args);
          ended();
        }, fail);
      } else {
        end.apply(out, args);
        ended();
      }
      return out;
    }) as typeof out.end;
    const onClose =
      onCallEnd &&
      (() => onCallEnd(req, method, protocol, res.writableEnded ? (code ?? outcome()) : Code.Canceled));
    if (onClose) res.once("close", onClose);
    try {
      adapter(req, res);
    } catch (err) {
      // The caller answers and reports a call this throws for (`StockDispatch`), through
      // Node's own methods: the ones above held a Connect error body given to `end` and sent
      // a bodiless 500, and the end reported here too counted and logged the call twice.
      if (onClose) res.off("close", onClose);
      Object.assign(out, { writeHead, write, end, addTrailers });
      throw err;
    }

    /** A Connect unary error body: refined, enveloped (errorBody), with its new length. */
    function connectError(original: Uint8Array): Maybe<Uint8Array> {
      code = connectErrorCode(original, status);
      let parsed: ConnectError;
      try {
        parsed = errorFromJsonBytes(original, undefined, new ConnectError("", code));
      } catch {
        // Not an error of a call: Connect's 405 and 415 have no body (its spec says so). Sent
        // as they are; thrown from `end`, the answer was never written and the stream hung.
        head["content-length"] = original.byteLength;
        return original;
      }
      const error = refined(req, method, parsed);
      return then(error, (better) => {
        let body = original;
        if (better !== undefined) {
          code = better.code;
          status = codeToHttpStatus(better.code);
          body = errorToJsonBytes(better, jsonOptions);
          const metadata = nodeHeaders(better.metadata);
          for (const k in metadata) head[k] = metadata[k];
        }
        if (errorBody) body = errorBody(req, body);
        head["content-length"] = body.byteLength;
        return body;
      });
    }

    /** gRPC status trailers, refined when they carry an error Connect raised itself. */
    function grpcTrailers(headers: http.OutgoingHttpHeaders): Maybe<http.OutgoingHttpHeaders> {
      const web = new Headers(headers as Record<string, string>);
      const error = findTrailerError(web);
      if (error === undefined) return headers;
      return then(refined(req, method, error), (better) => {
        if (better === undefined) return headers;
        for (const k of ["grpc-status", "grpc-message", "grpc-status-details-bin"]) web.delete(k);
        return nodeHeaders(setTrailerStatus(web, better));
      });
    }

    /** A gRPC-Web trailer frame, refined like gRPC's trailers. */
    function grpcWebTrailer(frame: Uint8Array): Maybe<Uint8Array> {
      const length = new DataView(frame.buffer, frame.byteOffset + 1, 4).getUint32(0);
      if (5 + length !== frame.byteLength) return frame;
      const parsed = trailerParse(frame.subarray(5));
      const error = findTrailerError(parsed);
      if (error === undefined) return frame;
      return then(refined(req, method, error), (better) => grpcWebFrame(parsed, better, frame));
    }

    /** The code the call ended with, read from what was written (as for Connect's handlers on the fast transport). */
    function outcome(): number {
      const uRes: UniversalServerResponse = {
        status,
        header: new Headers(head as Record<string, string>),
        ...(trailer ? { trailer: new Headers(trailer as Record<string, string>) } : {}),
      };
      return streamedCode(uRes, last);
    }
  };
}

/** A gRPC-Web trailer frame with `better`'s status in place of the one `parsed` holds (or `frame` unchanged). */
function grpcWebFrame(parsed: Headers, better: ConnectError | undefined, frame: Uint8Array): Uint8Array {
  if (better === undefined) return frame;
  for (const k of ["grpc-status", "grpc-message", "grpc-status-details-bin"]) parsed.delete(k);
  return encodeEnvelope(trailerFlag, trailerSerialize(setTrailerStatus(parsed, better)));
}

type Maybe<T> = T | Promise<T>;

/** `f` of `value`, at once when it is not a promise (no microtask), else once it resolves. */
function then<T, U>(value: Maybe<T>, f: (v: T) => U): Maybe<U> {
  return value instanceof Promise ? value.then(f) : f(value);
}

/**
 * connect-node's adapter makes the request's URL from its authority (`new URL(path,
 * "https://" + authority)`) in Node's request listener, and throws when there is none (an
 * HTTP/1.0 request without Host) or it does not parse (`Host: a b`, `:authority: [`): thrown
 * there, any anonymous client ended the process with one request. Such an authority is
 * replaced by `localhost`, the one the fast transport puts in the call's URL then: the URL
 * is read only by Connect GET (a query), and no call is served differently for it.
 */
function parseableAuthority(req: http.IncomingMessage | http2.Http2ServerRequest): void {
  const http2 = "authority" in req;
  const authority = http2 ? req.authority : req.headers.host;
  if (authority !== undefined && URL.canParse(`https://${authority}`)) return;
  if (http2) {
    // Http2ServerRequest's `authority` reads these (`:authority`, else Host).
    req.headers[":authority"] = "localhost";
    delete req.headers.host;
  } else req.headers.host = "localhost";
}

/** A Node request's headers read as fetch Headers' `get` reads them (repeats joined with ", "). */
function headerSource(req: http.IncomingMessage | http2.Http2ServerRequest): RequestHeaders {
  return {
    get(name) {
      const v = req.headers[name];
      return v === undefined ? null : typeof v === "string" ? v : v.join(", ");
    },
  };
}

/**
 * Cap the bytes connect-node reads from the request at `maxBytes`: past it the body's
 * iterator fails with ResourceExhausted (as Tessera's adapter does). The request is not
 * destroyed when the reader stops (`destroyOnReturn: false`): its unread rest is dealt
 * with once the answer is out (stopUnreadBody).
 */
function limitBody(req: http.IncomingMessage | http2.Http2ServerRequest, maxBytes: number): void {
  const chunks = () => req.iterator({ destroyOnReturn: false });
  (req as unknown as { [Symbol.asyncIterator]: () => AsyncIterator<Uint8Array> })[Symbol.asyncIterator] =
    async function* limited() {
      let received = 0;
      for await (const chunk of chunks()) {
        received += (chunk as Uint8Array).byteLength;
        if (received > maxBytes)
          throw new ConnectError(`request body larger than ${maxBytes} bytes`, Code.ResourceExhausted);
        yield chunk as Uint8Array;
      }
    };
}
