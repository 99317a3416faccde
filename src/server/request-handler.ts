import type { IncomingMessage, OutgoingHttpHeaders } from "node:http";
import type http2 from "node:http2";
import type { DescMethod } from "@bufbuild/protobuf";
import { Code, cors as connectCors } from "@connectrpc/connect";
import { type AdmissionDeps, createAdmissionHooks } from "../admission/index.js";
import type { App } from "../app.js";
import { createCallObserver, createHttpObserver, createUnknownPathObserver } from "../call-observer.js";
import { budgetKey } from "../client-ip.js";
import { CallValues, requestStateKey } from "../context.js";
import { toConnectError } from "../errors.js";
import { toWireError } from "../interceptors/errors.js";
import { tooManyStreamsError } from "../rate-limit.js";
import {
  earlyProtocol,
  refuseStream,
  setHeaders,
  stopUnreadPlainBody,
  streamProtocol,
} from "../transport/early-answers.js";
import { augmentJsonErrorBody } from "../transport/error-wire.js";
import { createTransport } from "../transport/index.js";
import type {
  NodeRequest as Request,
  NodeResponse as Response,
  StreamingHandler,
} from "../transport/stream-server.js";
import type { UnaryProtocol } from "../transport/unary-protocols.js";

import type { PeerTrust } from "./peer-trust.js";
import { createPlainEndpoints, PLAIN_PATHS } from "./plain-endpoints.js";
import {
  closesConnection,
  createStateAttacher,
  type HandshakeFacts,
  requestIdOf,
  stateOf,
} from "./request-facts.js";

/**
 * The HTTP/1.1 header lines a request may have (the server's `maxHeadersCount`). Node's parser
 * drops the lines past its limit without a word, a repeated Authorization or X-API-Key among
 * them, so a request that reached it is answered 431 rather than served from part of its headers.
 */
export const MAX_HTTP1_HEADERS = 256;

/** Strict-Transport-Security, sent over TLS only (seed 003). */
const HSTS = "max-age=31536000; includeSubDomains";

/**
 * A response's request id and security headers (seed 003): a new object per response, made
 * as one literal, since the answer's own headers are added to it (transport/early-answers.ts):
 * a spread copy of shared headers was slower to make and to add to. Without TLS `hsts` is
 * undefined: Node's HTTP/2 `respond` leaves such a header out, and so does `setHeaders`.
 */
function securedHeaders(requestId: string, hsts: string | undefined): OutgoingHttpHeaders {
  return {
    "x-request-id": requestId,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "1; mode=block",
    "content-security-policy": "default-src 'self'",
    "strict-transport-security": hsts,
  };
}

/**
 * The request handler: request id, security headers and CORS on every response, the
 * plain HTTP endpoints (/health, /ready, /.well-known/jwks.json: plain-endpoints.ts), the
 * OAuth 2.0 endpoints (src/oauth/), and the transport serving gRPC, gRPC-Web and Connect
 * for everything else, with the request's facts attached (request-facts.ts) and its
 * admission hooks (src/admission/index.ts).
 */
export function createRequestHandler(
  app: App,
  options: {
    tls: boolean;
    /** Whether the server is draining (shutting down): /ready then answers 503 whatever the database says. */
    draining?: () => boolean;
    /** The CA and CRL a client certificate is held to on every request (see peer-trust.ts). */
    peerTrust?: () => PeerTrust;
    /** What a connection's handshake verified its client certificate against, and until when (see request-facts.ts). */
    handshake?: HandshakeFacts;
  },
) {
  const { config } = app;
  const tls = options.tls;
  const hsts = tls ? HSTS : undefined;
  const allowedOrigins = new Set(config.cors.allowedOrigins);
  const anyOrigin = allowedOrigins.has("*");
  // With a list of origins an answer differs by Origin (allowed or not) even when the request
  // has none: without Vary a shared cache keeps the JWKS or discovery document answered to
  // a request without Origin (public, max-age=300) and serves it to a browser of an allowed
  // origin, which then refuses it for want of CORS headers.
  const varyOrigin = !anyOrigin && allowedOrigins.size > 0;
  const exposed = [
    ...connectCors.exposedHeaders,
    "X-Request-Id",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "WWW-Authenticate",
  ].join(", ");
  const allowHeaders = [
    ...new Set([...connectCors.allowedHeaders, "Authorization", "X-API-Key", "X-Request-Id"]),
  ].join(", ");

  /**
   * The headers every response to `req` carries: its request id, the security headers and,
   * for an allowed origin, CORS.
   */
  function commonHeaders(req: Request, requestId: string): OutgoingHttpHeaders {
    const common = securedHeaders(requestId, hsts);
    // HTTP/1.1 only (the header is forbidden in HTTP/2, where the connection gets GOAWAY).
    if (closesConnection(req)) common.connection = "close";
    const origin = req.headers.origin;
    if (varyOrigin) common.vary = "Origin";
    if (corsAllowed(origin)) {
      common["access-control-allow-origin"] = anyOrigin ? "*" : origin;
      common["access-control-expose-headers"] = exposed;
    }
    return common;
  }

  function corsAllowed(origin: string | undefined): origin is string {
    return origin !== undefined && origin !== "" && (anyOrigin || allowedOrigins.has(origin));
  }

  const attachState = createStateAttacher(
    config,
    options.tls,
    options.peerTrust,
    options.handshake,
    app.clock,
  );
  const admission: AdmissionDeps = { authenticator: app.authenticator, limits: app.limits, audit: app.audit };
  // Metrics and the access log of every call, when either is on (see call-observer.ts).
  const observe = createCallObserver({
    metrics: app.metrics,
    log: app.accessLog,
    access: config.log.access,
    prefixes: {
      pat: config.auth.tokens.patPrefix,
      apiKey: config.auth.tokens.apiKeyPrefix,
      machine: config.auth.tokens.machinePrefix,
    },
  });
  const observeUnknown = createUnknownPathObserver({
    metrics: app.metrics,
    log: app.accessLog,
    access: config.log.access,
  });
  const observeHttp = createHttpObserver({
    metrics: app.metrics,
    log: app.accessLog,
    access: config.log.access,
  });
  // connect-node's adapter with a leaner bridge to Node (see transport/fast-adapter.ts for why).
  const adapter = createTransport(config.server.transport, {
    routes: app.routes,
    interceptors: app.interceptors,
    // A message is capped after decompression too (connect-node inflates with zlib's
    // maxOutputLength, which stops as soon as the cap is passed), and never past the
    // body limit: a small gzip body cannot become megabytes per call.
    readMaxBytes: Math.min(config.server.readMaxBytes, config.server.maxBodyBytes),
    maxBodyBytes: config.server.maxBodyBytes,
    logger: app.logger,
    // Connect errors get the envelope fields, whatever the request's content type: their body
    // is JSON for binary clients too, and an early refusal has them (the adapter calls this
    // for error responses only).
    errorBody: (req, body) => augmentJsonErrorBody(body, stateOf(req).errorInfo),
    contextValues: (req) => new CallValues().set(requestStateKey, stateOf(req)),
    // The facts of a unary call served from its HTTP/2 stream (see serveRequests).
    prepare: attachState,
    // Set by the adapter with the answer: over HTTP/2 written with it in one go (see transport/stream-server.ts).
    responseHeaders: (req) => commonHeaders(req, stateOf(req).requestId),
    ...createAdmissionHooks(app, admission),
    // A path nothing serves: answered 404 by the transport, counted and logged here under
    // fixed names, never its path.
    onNotFound: (req) => {
      const protocol = earlyProtocol(req.method, req.headers["content-type"])?.kind;
      observeUnknown?.(stateOf(req), req.method, protocol);
    },
    // A call failing outside the pipeline (a fault of admission's hooks or of the transport):
    // INTERNAL with the request id in its ErrorInfo, logged once with it, as inside.
    internalError: (req, method, err) =>
      toWireError(err, stateOf(req), `${method.parent.typeName}/${method.name}`, app.logger),
    ...(observe
      ? {
          onCallEnd: (req: Request, method: DescMethod, protocol: UnaryProtocol, code: number) =>
            observe(stateOf(req), req.headers, method, protocol, code),
        }
      : {}),
  });
  const maxStreamsPerIp = config.server.maxStreamsPerIp;
  const openStreams = new Map<string, number>();
  const servePlain = createPlainEndpoints(app, options.draining);
  const maxBodyBytes = config.server.maxBodyBytes;

  const handle = function handle(req: IncomingMessage | http2.Http2ServerRequest, res: Response): void {
    const requestId = requestIdOf(req);
    // For the answers written here; the adapter sets them on its own (`responseHeaders`).
    const setCommonHeaders = () => setHeaders(res, commonHeaders(req, requestId));

    // Over HTTP/2 a header list past its bound resets the stream before it gets here.
    if (!("stream" in req) && req.rawHeaders.length >= 2 * MAX_HTTP1_HEADERS) {
      setCommonHeaders();
      res.setHeader("connection", "close");
      res.statusCode = 431;
      res.end();
      // Counted and logged like any answer, under a fixed name (never the request's path).
      attachState(req, requestId);
      observeHttp?.(stateOf(req), {
        path: "unknown",
        httpMethod: req.method,
        status: 431,
        error: "request_header_fields_too_large",
      });
      return;
    }

    if (req.method === "OPTIONS" && corsAllowed(req.headers.origin)) {
      setCommonHeaders();
      res.setHeader("access-control-allow-methods", "GET, POST, PUT, DELETE, OPTIONS");
      res.setHeader("access-control-allow-headers", allowHeaders);
      res.setHeader("access-control-max-age", String(config.cors.maxAge));
      res.statusCode = 204;
      res.end();
      // Answers given without reading a body a client may still be sending are not left
      // holding their stream until requestTimeoutSeconds (transport/early-answers.ts).
      stopUnreadPlainBody(req, res, maxBodyBytes);
      return;
    }

    const path = (req.url ?? "/").split("?")[0];
    if ((req.method === "GET" || req.method === "HEAD") && PLAIN_PATHS.has(path!)) {
      setCommonHeaders();
      servePlain(path!, res, requestId);
      stopUnreadPlainBody(req, res, maxBodyBytes);
      return;
    }

    // OAuth 2.0 (src/oauth/): form-encoded POSTs and the discovery document, not RPCs.
    if (app.oauth.handles(path!)) {
      attachState(req, requestId);
      setCommonHeaders();
      app.oauth.serve(req, res, path!, stateOf(req));
      return;
    }

    attachState(req, requestId);
    const method = adapter.methodOf(req.url);
    if (method !== undefined && method.methodKind !== "unary" && maxStreamsPerIp > 0) {
      // Streaming calls (Health/Watch, reflection) outlive their request: bounded per
      // client address, over all its connections, or a few peers hold them by the thousand.
      // An IPv6 client's whole /64 counts as one address, as for every per-IP budget.
      const ip = budgetKey(stateOf(req).ip);
      const n = (openStreams.get(ip) ?? 0) + 1;
      if (n > maxStreamsPerIp) {
        setCommonHeaders();
        // A limit on streams held at once (retry once one ends): RATE_LIMITED with Retry-After
        // and the ErrorInfo every error carries, in the access log and metrics too.
        // Its stream is reset once answered: held until its body ends, a refused stream kept
        // what the limit protects (body never sent, each one held until requestTimeoutSeconds).
        refuseStream(req, res, toConnectError(tooManyStreamsError(), requestId), maxBodyBytes);
        stateOf(req).errorInfo = { reason: "RATE_LIMITED", requestId };
        observe?.(stateOf(req), req.headers, method, streamProtocol(req), Code.ResourceExhausted);
        return;
      }
      openStreams.set(ip, n);
      res.once("close", () => {
        const left = (openStreams.get(ip) ?? 1) - 1;
        if (left === 0) openStreams.delete(ip);
        else openStreams.set(ip, left);
      });
    }
    adapter(req, res);
  } as StreamingHandler;
  // Unary calls over HTTP/2, answered by the transport on the stream itself (see serveRequests):
  // never a preflight (OPTIONS) or a plain endpoint (GET), which are answered above.
  handle.stream = adapter.stream;
  return handle;
}
