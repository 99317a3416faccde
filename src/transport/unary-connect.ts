/** The Connect protocol's unary POST (JSON and binary), as Connect's own unary handler serves it. */
import type { OutgoingHttpHeaders } from "node:http";
import { compressionNegotiate, readAllBytes } from "@connectrpc/connect/protocol";
import * as connect from "@connectrpc/connect/protocol-connect";
import { invokeUnary, UnaryCall } from "./unary-call.js";
import type { HandlerOptions, Lookup, UnaryHandler, UnarySpec } from "./unary-core.js";
import { asConnectError, CALL_DONE, callError, H, headerOf, nodeHeaders } from "./unary-core.js";

/** The Connect protocol's unary POST, as Connect's `createUnaryHandler` serves it. */
export function connectUnary(opt: HandlerOptions, spec: UnarySpec, serialization: Lookup): UnaryHandler {
  return async function handleConnectUnary(req) {
    const type = connect.parseContentType(headerOf(req, H.contentType));
    const binary = type?.binary === true;
    const timeout = connect.parseTimeout(headerOf(req, H.connectTimeout), opt.maxTimeoutMs);
    const contentType = binary ? connect.contentTypeUnaryProto : connect.contentTypeUnaryJson;
    const context = new UnaryCall(
      spec.method,
      "connect",
      req,
      opt.shutdownSignal,
      timeout.timeoutMs,
      { "content-type": contentType },
      undefined,
    );
    const compression = compressionNegotiate(
      opt.acceptCompression,
      headerOf(req, H.connectEncoding),
      headerOf(req, H.connectAcceptEncoding),
      connect.headerUnaryAcceptEncoding,
    );
    let status = 200;
    let code = 0;
    let body: Uint8Array;
    try {
      if (compression.error) throw compression.error;
      if (timeout.error) throw timeout.error;
      let bytes = await readAllBytes(req.body, opt.readMaxBytes, headerOf(req, H.contentLength));
      if (compression.request) bytes = await compression.request.decompress(bytes, opt.readMaxBytes);
      const input = serialization.getI(binary).parse(bytes);
      const output = await invokeUnary(spec, context, input, opt.interceptors);
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
      header = nodeHeaders(connect.trailerMux(context.responseHeader, context.responseTrailer));
    } else {
      // Nothing read or changed the response headers or trailers: what they would hold.
      header = { "content-type": contentType };
      if (encoding !== undefined) header["content-encoding"] = encoding;
    }
    header["content-length"] = body.byteLength.toString(10);
    return { status, header, body, plain: !context.responseTouched, code };
  };
}
