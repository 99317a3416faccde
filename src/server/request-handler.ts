import { randomUUID } from "node:crypto";
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from "node:http";
import type http2 from "node:http2";
import type { TLSSocket } from "node:tls";
import type { DescMethod } from "@bufbuild/protobuf";
import { Code, type ConnectError, cors as connectCors, createContextValues } from "@connectrpc/connect";
import { type AdmissionDeps, admit, admitFailedCall, BEFORE_BODY } from "../admission/index.js";
import type { App } from "../app.js";
import type { HeaderSource } from "../auth/credentials.js";
import type { PeerCertificateInfo } from "../auth/principal.js";
import { createCallObserver } from "../call-observer.js";
import { budgetKey, createClientIpResolver, createTrustedProxyCheck } from "../client-ip.js";
import { type RequestState, requestState, requestStateKey } from "../context.js";
import { isRefusal, TesseraError, tesseraErrorInfo } from "../errors.js";
import { toWireError } from "../interceptors/errors.js";
import { createIntrospectionEndpoint, INTROSPECTION_PATH } from "../oauth/introspect.js";
import { refuseStream, setHeaders, streamProtocol, type WireError } from "../transport/early-answers.js";
import { augmentJsonErrorBody, refusalOnTheWire } from "../transport/error-wire.js";
import { createTransport } from "../transport/index.js";
import type { StreamingHandler, StreamRequest } from "../transport/stream-server.js";
import type { UnaryProtocol } from "../transport/unary-protocols.js";
import { VERSION } from "../version.js";

type Request = IncomingMessage | http2.Http2ServerRequest | StreamRequest;
type Response = ServerResponse | http2.Http2ServerResponse;

const securityHeaders = (tls: boolean): Readonly<Record<string, string>> => ({
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "x-xss-protection": "1; mode=block",
  "content-security-policy": "default-src 'self'",
  ...(tls ? { "strict-transport-security": "max-age=31536000; includeSubDomains" } : {}),
});

const REQUEST_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
/** The plain HTTP endpoints, answered by the request handler itself. */
const PLAIN_PATHS = new Set(["/health", "/ready", "/.well-known/jwks.json"]);
const kState = Symbol("tessera.requestState");

/** The request state the handler attached to an RPC request before handing it to the adapter. */
function stateOf(req: Request): RequestState {
  return (req as unknown as Record<symbol, RequestState>)[kState]!;
}

/** Node's incoming headers read as fetch Headers would read them (repeats joined with ", "). */
function nodeHeaderSource(headers: IncomingMessage["headers"]): HeaderSource {
  return {
    get(name) {
      const v = headers[name];
      return v === undefined ? null : typeof v === "string" ? v : v.join(", ");
    },
  };
}

function parseCertificate(socket: TLSSocket): PeerCertificateInfo | null {
  if (!socket.authorized) return null;
  const cert = socket.getPeerCertificate(false);
  if (!cert?.raw) return null;
  const hex = cert.fingerprint256.replace(/:/g, "").toLowerCase();
  const sanUris = (cert.subjectaltname ?? "")
    .split(/,\s*/)
    .filter((s) => s.startsWith("URI:"))
    .map((s) => s.slice(4));
  const cn = cert.subject?.CN;
  return {
    sha256Fingerprint: hex,
    thumbprint: Buffer.from(hex, "hex").toString("base64url"),
    commonName: Array.isArray(cn) ? (cn[0] ?? null) : (cn ?? null),
    sanUris,
  };
}

/**
 * The request handler: request id, security headers and CORS on every response, the
 * plain HTTP endpoints (/health, /ready, /.well-known/jwks.json), the OAuth 2.0 endpoints
 * (src/oauth/), and the Connect adapter
 * serving gRPC, gRPC-Web and Connect for everything else.
 */
export function createRequestHandler(
  app: App,
  options: {
    tls: boolean;
    /** Whether the server is draining (shutting down): /ready then answers 503 whatever the database says. */
    draining?: () => boolean;
  },
) {
  const { config } = app;
  const certCache = new WeakMap<object, PeerCertificateInfo | null>();
  const headers = securityHeaders(options.tls);
  const allowedOrigins = new Set(config.cors.allowedOrigins);
  const anyOrigin = allowedOrigins.has("*");
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
    const common: OutgoingHttpHeaders = { "x-request-id": requestId, ...headers };
    const origin = req.headers.origin;
    if (corsAllowed(origin)) {
      common["access-control-allow-origin"] = anyOrigin ? "*" : origin;
      if (!anyOrigin) common.vary = "Origin";
      common["access-control-expose-headers"] = exposed;
    }
    return common;
  }

  function corsAllowed(origin: string | undefined): origin is string {
    return origin !== undefined && origin !== "" && (anyOrigin || allowedOrigins.has(origin));
  }

  const admission: AdmissionDeps = { authenticator: app.authenticator, limits: app.limits, audit: app.audit };
  const introspect = createIntrospectionEndpoint({
    admission,
    verifier: app.verifier,
    maxBodyBytes: config.server.maxBodyBytes,
    logger: app.logger,
  });
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
    contextValues: (req) => createContextValues().set(requestStateKey, stateOf(req)),
    // Set by the adapter with the answer: over HTTP/2 written with it in one go (see transport/fast-adapter.ts).
    responseHeaders: (req) => commonHeaders(req, stateOf(req).requestId),
    // An error Connect raised itself (no ErrorInfo: a body that does not parse, too large…,
    // before the interceptors): admission first finishes what it left for the pipeline
    // (admitFailedCall), so its refusal is the answer and is audited; else Connect's own
    // InvalidArgument gets the reason and request id every other refusal carries.
    callError: (error, values, method, headers) => {
      if (tesseraErrorInfo(error) !== undefined) return error;
      const state = requestState(values);
      const name = `${method.parent.typeName}/${method.name}`;
      const answer = (decided: unknown): ConnectError =>
        decided !== error || error.code === Code.InvalidArgument
          ? toWireError(decided, state, name, app.logger)
          : error;
      const decided = admitFailedCall(admission, method, headers, state, error);
      return decided instanceof Promise ? decided.then(answer) : answer(decided);
    },
    // Asked only about calls that can be answered before their body; the others are admitted in
    // the pipeline (the admission interceptor), as is the authentication of an audited call
    // (admission/index.ts).
    admit: (req, method) => {
      const state = stateOf(req);
      // A password check the full hash pool would refuse anyway: answered now, body unread.
      const shed = app.shedding.shed(method, state);
      if (shed !== undefined) return shed;
      const refusal = admit(admission, method, nodeHeaderSource(req.headers), state, BEFORE_BODY);
      // Decided synchronously (or nothing to decide): no promise.
      if (refusal === undefined) return undefined;
      if (refusal instanceof Promise)
        return refusal.then((r: unknown) => (r === undefined ? undefined : earlyRefusal(r, state, method)));
      return earlyRefusal(refusal, state, method);
    },
    ...(observe
      ? {
          onCallEnd: (req: Request, method: DescMethod, protocol: UnaryProtocol, code: number) =>
            observe(stateOf(req), req.headers, method, protocol, code),
        }
      : {}),
  });
  /** Admission's refusal of a call, answered before the pipeline. */
  function earlyRefusal(refusal: unknown, state: RequestState, method: DescMethod): ConnectError | WireError {
    // A refusal (not a fault, which is logged) in wire form, without a ConnectError (transport/error-wire.ts).
    if (refusal instanceof TesseraError && isRefusal(refusal.code)) {
      // As the error interceptor keeps it, for the access log and metrics (call-observer.ts).
      state.errorInfo = { reason: refusal.reason, requestId: state.requestId };
      return refusalOnTheWire(refusal, state.requestId, state.responseHeaders);
    }
    return toWireError(refusal, state, `${method.parent.typeName}/${method.name}`, app.logger);
  }

  function peerCertificate(req: Request): PeerCertificateInfo | null {
    if (!options.tls || config.server.mtls === "off") return null;
    // One parse per connection: the certificate cannot change within it.
    const owner: object = "stream" in req ? (req.stream.session ?? req.socket) : req.socket;
    let info = certCache.get(owner);
    if (info === undefined) {
      info = parseCertificate(req.socket as TLSSocket);
      certCache.set(owner, info);
    }
    return info;
  }

  const maxStreamsPerIp = config.server.maxStreamsPerIp;
  const openStreams = new Map<string, number>();

  const resolveIp = createClientIpResolver(config.server);
  const isProxy = createTrustedProxyCheck(config.server);
  /** The connection's direct peer address. */
  function peerOf(req: Request): string | undefined {
    // HTTP/2: the session's socket (one per connection), not req.socket (a Proxy made per stream).
    const socket = "stream" in req ? (req.stream.session?.socket ?? req.socket) : req.socket;
    return socket.remoteAddress;
  }

  function json(res: Response, status: number, body: unknown, cacheControl = "no-store") {
    const text = JSON.stringify(body);
    res.statusCode = status;
    res.setHeader("content-type", "application/json");
    res.setHeader("cache-control", cacheControl);
    res.end(text);
  }

  /** The caller's request id when it is a sane one, else a new one. */
  function requestIdOf(req: Request): string {
    const incoming = req.headers["x-request-id"];
    return typeof incoming === "string" && REQUEST_ID_RE.test(incoming) ? incoming : randomUUID();
  }

  /** Attach the request's state (read back by `stateOf`) for the adapter's callbacks and the interceptors. */
  function attachState(req: Request, requestId: string): void {
    const peer = peerOf(req);
    const state: RequestState = {
      requestId,
      ip: resolveIp(peer, req.headers),
      certificate: peerCertificate(req),
      principal: null,
      startedAt: performance.now(),
    };
    if (isProxy(peer)) state.viaProxy = true;
    (req as unknown as Record<symbol, RequestState>)[kState] = state;
  }

  const handle = function handle(req: IncomingMessage | http2.Http2ServerRequest, res: Response): void {
    const requestId = requestIdOf(req);
    // For the answers written here; the adapter sets them on its own (`responseHeaders`).
    const setCommonHeaders = () => setHeaders(res, commonHeaders(req, requestId));

    if (req.method === "OPTIONS" && corsAllowed(req.headers.origin)) {
      setCommonHeaders();
      res.setHeader("access-control-allow-methods", "GET, POST, PUT, DELETE, OPTIONS");
      res.setHeader("access-control-allow-headers", allowHeaders);
      res.setHeader("access-control-max-age", String(config.cors.maxAge));
      res.statusCode = 204;
      res.end();
      return;
    }

    const path = (req.url ?? "/").split("?")[0];
    if ((req.method === "GET" || req.method === "HEAD") && PLAIN_PATHS.has(path!)) {
      setCommonHeaders();
      if (path === "/health") {
        json(res, 200, {
          ok: true,
          data: {
            status: "healthy",
            version: VERSION,
            uptime: Math.floor((Date.now() - app.startedAt) / 1000),
          },
        });
        return;
      }
      if (path === "/ready") {
        if (options.draining?.()) {
          // Shutting down: a load balancer stops sending new work while calls already sent
          // (and new ones on open connections, until the listener closes) still complete.
          json(res, 503, {
            ok: false,
            error: "Service Unavailable",
            code: "UNAVAILABLE",
            message: "draining: shutting down",
            request_id: requestId,
          });
          return;
        }
        app.storage.ping().then(
          (up) =>
            up
              ? json(res, 200, { ok: true, data: { status: "ready", database: "up" } })
              : json(res, 503, {
                  ok: false,
                  error: "Service Unavailable",
                  code: "UNAVAILABLE",
                  message: "database unavailable",
                  request_id: requestId,
                }),
          () =>
            json(res, 503, {
              ok: false,
              error: "Service Unavailable",
              code: "UNAVAILABLE",
              message: "database unavailable",
              request_id: requestId,
            }),
        );
        return;
      }
      if (path === "/.well-known/jwks.json") {
        // Short cache: verifiers pick up a rotated key within minutes.
        json(res, 200, app.jwt.jwks(), "public, max-age=300");
        return;
      }
    }

    // OAuth 2.0 (src/oauth/): form-encoded POSTs and the discovery document, not RPCs.
    if (app.oauth.handles(path!)) {
      setCommonHeaders();
      attachState(req, requestId);
      app.oauth.serve(req, res, path!, stateOf(req));
      return;
    }

    attachState(req, requestId);
    if (path === INTROSPECTION_PATH) {
      setCommonHeaders();
      introspect(req, res, stateOf(req), nodeHeaderSource(req.headers));
      return;
    }
    const method = adapter.methodOf(req.url);
    if (method !== undefined && method.methodKind !== "unary" && maxStreamsPerIp > 0) {
      // Streaming calls (Health/Watch, reflection) outlive their request: bounded per
      // client address, over all its connections, or a few peers hold them by the thousand.
      // An IPv6 client's whole /64 counts as one address, as for every per-IP budget.
      const ip = budgetKey(stateOf(req).ip);
      const n = (openStreams.get(ip) ?? 0) + 1;
      if (n > maxStreamsPerIp) {
        setCommonHeaders();
        refuseStream(req, res);
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
  // Unary calls over HTTP/2, answered by the adapter on the stream itself (see serveRequests);
  // never a preflight (OPTIONS) or a plain endpoint (GET), which are answered above.
  handle.stream = (stream, headers) =>
    adapter.stream(stream, headers, (req) => attachState(req, requestIdOf(req)));
  return handle;
}
