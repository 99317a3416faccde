/**
 * A unary call, from its request body to its answer, in one place for every protocol:
 * read and decode the one message, run the interceptors and the implementation
 * (`invokeUnary`), encode the one answer. Connect's unary POST (JSON and binary) is
 * `connectUnary`, gRPC and gRPC-Web are `grpcUnary`; the protocol details are Connect's own
 * exported code, called as its handlers call it (see unary-protocols.ts for why this is
 * written here), and the values a call makes (its context, envelopes) are beside it
 * (call-context.ts, unary-core.ts).
 */
import type { OutgoingHttpHeaders } from "node:http";
import { create, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import type {
  UnaryRequest as InterceptedRequest,
  UnaryResponse as InterceptedResponse,
  Interceptor,
} from "@connectrpc/connect";
import { readAllBytes } from "@connectrpc/connect/protocol";
import * as connect from "@connectrpc/connect/protocol-connect";
import * as grpc from "@connectrpc/connect/protocol-grpc";
import * as grpcWeb from "@connectrpc/connect/protocol-grpc-web";
import { CallRequest, CallResponse, copyHeaders, ImplementationContext, UnaryCall } from "./call-context.js";
import { isWholeBody } from "./node-bridge.js";
import type { HandlerOptions, Lookup, UnaryHandler, UnarySpec } from "./unary-core.js";
import {
  asConnectError,
  CALL_DONE,
  callError,
  compressedEnvelope,
  compressionNegotiator,
  concat,
  EMPTY,
  envelope,
  H,
  headerOf,
  nodeHeaders,
  readOneEnvelopedMessage,
  rememberParsed,
} from "./unary-core.js";

/** The protocol headers' parses, remembered per value (see `rememberParsed`), and the constant response headers. */
const connectType = rememberParsed(connect.parseContentType);
const grpcType = rememberParsed(grpc.parseContentType);
const grpcWebType = rememberParsed(grpcWeb.parseContentType);
const CONNECT_PROTO = { "content-type": connect.contentTypeUnaryProto };
const CONNECT_JSON = { "content-type": connect.contentTypeUnaryJson };

/** The Connect protocol's unary POST, as Connect's `createUnaryHandler` serves it. */
export function connectUnary(opt: HandlerOptions, spec: UnarySpec, serialization: Lookup): UnaryHandler {
  const parseTimeout = rememberParsed((value) => connect.parseTimeout(value, opt.maxTimeoutMs));
  const negotiate = compressionNegotiator(opt.acceptCompression, connect.headerUnaryAcceptEncoding);
  return async function handleConnectUnary(req) {
    const type = connectType(headerOf(req, H.contentType));
    const binary = type?.binary === true;
    const timeout = parseTimeout(headerOf(req, H.connectTimeout));
    const context = new UnaryCall(
      spec.method,
      "connect",
      req,
      opt.shutdownSignal,
      timeout.timeoutMs,
      binary ? CONNECT_PROTO : CONNECT_JSON,
      undefined,
    );
    const compression = negotiate(headerOf(req, H.connectEncoding), headerOf(req, H.connectAcceptEncoding));
    let status = 200;
    let code = 0;
    let body: Uint8Array;
    try {
      if (compression.error) throw compression.error;
      if (timeout.error) throw timeout.error;
      const lengthHint = headerOf(req, H.contentLength);
      let bytes = await (isWholeBody(req.body)
        ? req.body.readAll(opt.readMaxBytes, lengthHint)
        : readAllBytes(req.body, opt.readMaxBytes, lengthHint));
      if (compression.request) bytes = await compression.request.decompress(bytes, opt.readMaxBytes);
      const input = serialization.getI(binary).parse(bytes);
      const output = outputOf(context, await invokeUnary(spec, context, input, opt.interceptors));
      body = serialization.getO(binary).serialize(output);
    } catch (e) {
      context.abort(e);
      const answered = callError(opt, asConnectError(e), context, spec, req);
      const error = answered instanceof Promise ? await answered : answered;
      code = error.code;
      status = connect.codeToHttpStatus(error.code);
      context.responseHeader.set(connect.headerContentType, connect.contentTypeUnaryJson);
      error.metadata.forEach((value, key) => {
        context.responseHeader.set(key, value);
      });
      body = connect.errorToJsonBytes(error, opt.jsonOptions ?? {});
    } finally {
      context.abort(CALL_DONE);
    }
    let encoding: string | undefined;
    if (compression.response && body.byteLength >= opt.compressMinBytes) {
      body = await compression.response.compress(body);
      encoding = compression.response.name;
    }
    let header: OutgoingHttpHeaders;
    if (context.responseTouched) {
      if (encoding !== undefined) context.responseHeader.set(connect.headerUnaryEncoding, encoding);
      // Trailers never read or changed are empty: nothing to mux in.
      header = nodeHeaders(
        context.trailerTouched
          ? connect.trailerMux(context.responseHeader, context.responseTrailer)
          : context.responseHeader,
      );
    } else {
      // Nothing read or changed the response headers or trailers: what they would hold.
      header = context.plainResponseHeader();
      if (encoding !== undefined) header["content-encoding"] = encoding;
    }
    header["content-length"] = body.byteLength.toString(10);
    return { status, header, body, plain: !context.responseTouched, code };
  };
}

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
  const parseType = web ? grpcWebType : grpcType;
  const protoHeader = { "content-type": types.contentTypeProto };
  const jsonHeader = { "content-type": types.contentTypeJson };
  const parseTimeout = rememberParsed((value) => grpc.parseTimeout(value, opt.maxTimeoutMs));
  const negotiate = compressionNegotiator(opt.acceptCompression, grpc.headerAcceptEncoding);
  return async function handleGrpcUnary(req) {
    const binary = parseType(headerOf(req, H.contentType))?.binary !== false;
    const timeout = parseTimeout(headerOf(req, H.grpcTimeout));
    const compression = negotiate(headerOf(req, H.grpcEncoding), headerOf(req, H.grpcAcceptEncoding));
    const initialHeader = compression.response
      ? {
          "content-type": binary ? types.contentTypeProto : types.contentTypeJson,
          "grpc-encoding": compression.response.name,
        }
      : binary
        ? protoHeader
        : jsonHeader;
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
      const output = outputOf(context, await invokeUnary(spec, context, input, opt.interceptors));
      const data = serialization.getO(binary).serialize(output);
      message =
        compression.response === null
          ? envelope(0, data)
          : await compressedEnvelope(0, data, compression.response, opt.compressMinBytes);
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
    const header = touched ? nodeHeaders(context.responseHeader) : context.plainResponseHeader();
    if (!web) {
      // A new object (the writer may add to it), as a literal: a spread copy is slower to make.
      const trailer = touched ? nodeHeaders(context.responseTrailer) : { "grpc-status": grpc.grpcStatusOk };
      return { status: 200, header, body: message ?? EMPTY, trailer, plain: !touched, code };
    }
    const trailer = touched ? grpcWeb.trailerSerialize(context.responseTrailer) : GRPC_WEB_OK;
    const frame =
      compression.response === null
        ? envelope(grpcWeb.trailerFlag, trailer)
        : await compressedEnvelope(grpcWeb.trailerFlag, trailer, compression.response, opt.compressMinBytes);
    return { status: 200, header, body: message ? concat(message, frame) : frame, plain: !touched, code };
  };
}

/** The trailers of a successful gRPC call, and their gRPC-Web trailer frame's data. */
const GRPC_OK: Readonly<Record<string, string>> = { "grpc-status": grpc.grpcStatusOk };
const GRPC_WEB_OK = grpcWeb.trailerSerialize(new Headers(GRPC_OK));

/**
 * The interceptor chain, then the implementation, as Connect's `invokeUnaryImplementation`
 * runs them: the same request and response objects for the interceptors (the same
 * members, with the same values), the same context for the implementation (the call's,
 * with what the interceptors passed on), the output made a full message, and the
 * response headers and trailers the interceptors returned copied into the call's.
 *
 * Why not Connect's own: it reads the context's `signal` into the interceptors' request
 * and spreads the context for the implementation, so the AbortSignal that `UnaryCall`
 * makes only on demand would be made on every call. Here `signal` is a getter of both,
 * reading the call's signal when someone reads it. The chain is built per call, as
 * Connect builds it.
 *
 * Neither this nor the innermost step is an async function: the handlers await the chain's
 * promise themselves (then take its output with `outputOf`), and the implementation's
 * answer becomes the response in one `then`, an async frame and its awaits less per call.
 * A synchronous throw is a rejection, as it was from the async functions.
 */
export function invokeUnary(
  spec: UnarySpec,
  call: UnaryCall,
  input: MessageShape<DescMessage>,
  interceptors: Interceptor[],
): Promise<InterceptedResponse> {
  const { method } = spec;
  const respond = (output: MessageInitShape<DescMessage>) =>
    new CallResponse(call, create(method.output, output));
  let next = (req: InterceptedRequest): Promise<InterceptedResponse> => {
    try {
      return Promise.resolve(spec.impl(req.message, new ImplementationContext(call, req))).then(respond);
    } catch (e) {
      return Promise.reject(e);
    }
  };
  for (let i = interceptors.length - 1; i >= 0; i--)
    next = interceptors[i]!(next as Parameters<Interceptor>[0]) as typeof next;
  try {
    return next(new CallRequest(call, input));
  } catch (e) {
    return Promise.reject(e);
  }
}

/**
 * The output of the chain's response `res`. The call's own response has the call's headers
 * and trailers; one an interceptor made has its own (Connect copies them into the call's). A
 * copy of the call's response (`{ ...res }`) dropped the getters, and so has the call's, as
 * it had.
 */
export function outputOf(call: UnaryCall, res: InterceptedResponse): MessageShape<DescMessage> {
  if (!(res instanceof CallResponse)) {
    const { header, trailer } = res as Partial<InterceptedResponse>;
    if (header !== undefined) copyHeaders(header, call.responseHeader);
    if (trailer !== undefined) copyHeaders(trailer, call.responseTrailer);
  }
  return res.message;
}
