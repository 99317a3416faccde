import { randomUUID } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from "node:http";
import http2 from "node:http2";
import type { AddressInfo, Socket } from "node:net";
import { join } from "node:path";
import { createSecureContext, type TLSSocket } from "node:tls";
import type { DescMethod } from "@bufbuild/protobuf";
import { Code, type ConnectError, cors as connectCors, createContextValues } from "@connectrpc/connect";
import { type AdmissionDeps, admit, admitFailedCall, BEFORE_BODY } from "./admission/index.js";
import type { App } from "./app.js";
import type { HeaderSource } from "./auth/credentials.js";
import type { PeerCertificateInfo } from "./auth/principal.js";
import { createCallObserver } from "./call-observer.js";
import { ensureDevCertificates } from "./certs/dev-ca.js";
import { watchTlsFiles } from "./certs/watch.js";
import { budgetKey, createClientIpResolver, createTrustedProxyCheck } from "./client-ip.js";
import type { Config } from "./config.js";
import { type RequestState, requestState, requestStateKey } from "./context.js";
import { isRefusal, TesseraError, tesseraErrorInfo } from "./errors.js";
import { toWireError } from "./interceptors/errors.js";
import { listenError } from "./listen-check.js";
import { createIntrospectionEndpoint, INTROSPECTION_PATH } from "./oauth/introspect.js";
import { refuseStream, setHeaders, streamProtocol, type WireError } from "./transport/early-answers.js";
import { augmentJsonErrorBody, refusalOnTheWire } from "./transport/error-wire.js";
import { createTransport, installTransport } from "./transport/index.js";
import type { StreamingHandler, StreamRequest } from "./transport/stream-server.js";
import type { UnaryProtocol } from "./transport/unary-protocols.js";
import { VERSION } from "./version.js";

type Request = IncomingMessage | http2.Http2ServerRequest | StreamRequest;
type Response = ServerResponse | http2.Http2ServerResponse;

/** TLS files read from the cert folder. */
export interface TlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  crl?: Buffer;
}

/**
 * Read ca.crt, server.crt, server.key (and ca.crl when present) from the cert folder,
 * generating a development CA and server certificate first when allowed and absent.
 */
export async function loadTlsMaterial(config: Config["server"]): Promise<TlsMaterial> {
  const dir = config.certDir;
  const need = ["ca.crt", "server.crt", "server.key"].map((f) => join(dir, f));
  if (need.some((p) => !existsSync(p))) {
    if (!config.devCertificates) {
      throw new Error(
        `TLS files missing in ${dir} (need ca.crt, server.crt, server.key); set TESSERA_DEV_CERTIFICATES=true to generate development ones`,
      );
    }
    await ensureDevCertificates(dir);
  }
  const [ca, cert, key] = need.map((p) => readFileSync(p));
  const crlPath = join(dir, "ca.crl");
  return { ca: ca!, cert: cert!, key: key!, ...(existsSync(crlPath) ? { crl: readFileSync(crlPath) } : {}) };
}

/**
 * Check that the TLS files load and match, before anything is created: run before the
 * bootstrap so that a start that cannot serve creates no admin (the port is checked
 * earlier still, see listen-check.ts). With `generate: false`, missing files that
 * development certificates would fill are not an error and nothing is written: `tessera
 * serve` checks the files present before it touches the database, and generates the
 * missing ones only once the database is reached and migrated (an unreachable database
 * then fails the start with no files written).
 */
export async function preflight(cfg: Config["server"], options: { generate?: boolean } = {}): Promise<void> {
  if (cfg.insecurePlaintext) return;
  if (options.generate === false && cfg.devCertificates) {
    const missing = ["ca.crt", "server.crt", "server.key"].some((f) => !existsSync(join(cfg.certDir, f)));
    if (missing) return;
  }
  const m = await loadTlsMaterial(cfg);
  try {
    createSecureContext({ ca: m.ca, cert: m.cert, key: m.key, ...(m.crl ? { crl: m.crl } : {}) });
  } catch (err) {
    throw new Error(`bad TLS material in ${cfg.certDir}: ${(err as Error).message}`);
  }
}

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

/** A listening Tessera server. */
export interface TesseraServer {
  server: http2.Http2SecureServer | http2.Http2Server;
  port: number;
  /** e.g. https://127.0.0.1:50052 */
  url: string;
  /** Replace certificate, key, CA and CRL for new handshakes; open connections stay. */
  reloadTls(): Promise<void>;
  /**
   * Connections open from a peer address, as counted for `server.maxConnectionsPerIp` (0
   * when it is off): for an IPv6 address, from its whole /64.
   */
  connectionsFrom(ip: string): number;
  /**
   * Shut down: /ready answers 503 at once; for `drainDelayMs` (default 0) everything else
   * is served as before (new connections included), so that a load balancer probing
   * /ready takes the instance out before it stops accepting; then stop accepting (the port
   * is closed, HTTP/2 clients get GOAWAY), let calls in flight finish for up to `graceMs`
   * (default 2000), and cut every connection still open. Resolves once the server is
   * closed, with the number of calls cut short.
   */
  close(graceMs?: number, drainDelayMs?: number): Promise<{ cut: number }>;
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

/**
 * Bound what connections can hold: at most `maxConnections` in all and
 * `maxConnectionsPerIp` per peer address (more are closed at once, before any TLS work),
 * and none kept idle for longer than `idleTimeoutSeconds` (HTTP/2: GOAWAY, then closed
 * once no stream is left; HTTP/1.1: closed). Node keeps idle connections for ever by
 * default, each holding a descriptor and tens of KB. A request must arrive whole within
 * `requestTimeoutSeconds` (a body trickled a byte at a time keeps a connection busy, so
 * the idle timeout alone does not end it), and no stream lives past `maxStreamSeconds`.
 * Returns the number of connections open from an address, as counted for the limit.
 */
function boundConnections(
  server: http2.Http2SecureServer | http2.Http2Server,
  cfg: Config["server"],
  tls: boolean,
): (ip: string) => number {
  const open = new Map<string, number>();
  // By peer address and port: how a TLS socket finds its raw socket's count.
  const releases = new Map<string, () => void>();
  // The one per-stream listener (request deadline, stream lifetime, and the open streams
  // of each session that the idle timeout looks at): per-stream listeners and timers are a
  // cost every call pays, so each stream gets at most one "close" listener and one timer.
  const streamsOf = new WeakMap<http2.Http2Session, Set<http2.Http2Stream>>();
  boundRequestTimes(server, cfg, streamsOf);
  // net.Server closes connections past it as they are accepted.
  if (cfg.maxConnections > 0) server.maxConnections = cfg.maxConnections;
  if (cfg.maxConnectionsPerIp > 0) {
    const limit = cfg.maxConnectionsPerIp;
    // Prepended: decided before the TLS layer's own listener starts a handshake.
    server.prependListener("connection", (socket: Socket) => {
      // Counted per /64 for IPv6 (budgetKey): one client holds a whole /64, and per /128 it
      // would open 2^64 times the limit.
      const ip = budgetKey(socket.remoteAddress ?? "unknown");
      const n = (open.get(ip) ?? 0) + 1;
      if (n > limit) {
        socket.destroy();
        return;
      }
      open.set(ip, n);
      const peer = `${socket.remoteAddress ?? "unknown"}|${socket.remotePort}`;
      let counted = true;
      const release = () => {
        if (!counted) return;
        counted = false;
        releases.delete(peer);
        const left = (open.get(ip) ?? 1) - 1;
        if (left === 0) open.delete(ip);
        else open.set(ip, left);
      };
      releases.set(peer, release);
      socket.once("close", release);
    });
    // The TLS socket takes the raw socket's handle over: destroyed itself (an idle close),
    // its "close" is not always seen on the raw socket, and the address stayed counted.
    if (tls) {
      const watch = (socket: TLSSocket) => {
        const release = releases.get(`${socket.remoteAddress ?? "unknown"}|${socket.remotePort}`);
        if (release === undefined) return;
        if (socket.destroyed) release();
        else socket.once("close", release);
      };
      server.on("secureConnection", watch);
      // A handshake that fails or times out never reaches "secureConnection": its TLS socket
      // is handed over here, or the address stays counted for ever.
      server.on("tlsClientError", (_err: Error, socket: TLSSocket) => watch(socket));
    }
  }
  const connectionsFrom = (ip: string) => open.get(budgetKey(ip)) ?? 0;
  const idleMs = cfg.idleTimeoutSeconds * 1000;
  if (idleMs === 0) return connectionsFrom;
  // The TLS socket of each HTTP/2 session (the session only hands out a proxy that cannot
  // destroy it): node:http2 emits "session" from its own "secureConnection" listener, which
  // runs before ours, so ours pairs the socket with the session made just before.
  const socketOf = new WeakMap<http2.Http2Session, TLSSocket>();
  const tlsByPeer = new Map<string, TLSSocket>();
  let lastSession: http2.Http2Session | undefined;
  /** GOAWAY, close, and a hard close one idle period later (see below). */
  const closeIdle = (session: http2.Http2Session) => {
    session.goaway(http2.constants.NGHTTP2_NO_ERROR);
    session.close();
    // A peer that never sent its preface (or never reads) leaves data pending, and close()
    // (even destroy()) then waits for ever on the socket, holding it and its per-IP count.
    // Paired by "session" order, or else by the peer's address and port (the pairing by order
    // can miss under load, and the socket then stayed open, counted, for ever).
    const peer = session.socket ? `${session.socket.remoteAddress}|${session.socket.remotePort}` : "";
    const socket = socketOf.get(session) ?? tlsByPeer.get(peer);
    if (socket !== undefined)
      setTimeout(() => {
        if (!socket.destroyed) socket.destroy();
      }, idleMs).unref();
  };
  server.on("session", (session: http2.Http2Session) => {
    lastSession = session;
    // Filled and emptied by the per-stream listener of boundRequestTimes.
    const streams = new Set<http2.Http2Stream>();
    streamsOf.set(session, streams);
    // Fires after `idleMs` without a frame either way. A stream whose client still owes its
    // request (a body begun and stalled) is cancelled: it cannot hold the connection. One
    // whose request is complete (a call in progress, a server stream) keeps the session,
    // and the timer runs again after its next frame.
    // "on", not setTimeout's callback: that is a once listener, so a timeout that found the
    // session busy was its last, and the connection was kept for ever after its long call.
    session.on("timeout", () => {
      if (session.destroyed) return;
      // Closed (by us or by the peer's GOAWAY) yet still here an idle period later: its peer
      // neither finishes nor reads. End the connection, or its address stays counted.
      if (session.closed) {
        const peer = session.socket ? `${session.socket.remoteAddress}|${session.socket.remotePort}` : "";
        const socket = socketOf.get(session) ?? tlsByPeer.get(peer);
        if (socket !== undefined) socket.destroy();
        else session.destroy();
        return;
      }
      let busy = false;
      for (const stream of streams) {
        if (stream.state.remoteClose !== 1) stream.close(http2.constants.NGHTTP2_CANCEL);
        else busy = true;
      }
      if (!busy) closeIdle(session);
    });
    session.setTimeout(idleMs);
  });
  // HTTP/1.1 (allowHTTP1): an idle keep-alive connection is closed.
  if (tls)
    server.on("secureConnection", (socket: TLSSocket) => {
      const session = lastSession;
      lastSession = undefined;
      const peer = `${socket.remoteAddress}|${socket.remotePort}`;
      tlsByPeer.set(peer, socket);
      socket.once("close", () => {
        if (tlsByPeer.get(peer) === socket) tlsByPeer.delete(peer);
      });
      if (socket.alpnProtocol !== "h2") socket.setTimeout(idleMs, () => socket.destroy());
      else if (session !== undefined && session.socket?.remotePort === socket.remotePort)
        socketOf.set(session, socket);
    });
  return connectionsFrom;
}

/**
 * Cancel a request not received whole within `requestTimeoutSeconds` of its start, and a
 * stream still open `maxStreamSeconds` after it (a streaming call whose handler did not
 * end it first, as Health/Watch does with OK). One timer per stream, unref'd. Also keeps
 * `streamsOf` (the open streams of the sessions it has an entry for) for the idle timeout,
 * with the same one "close" listener.
 */
function boundRequestTimes(
  server: http2.Http2SecureServer | http2.Http2Server,
  cfg: Config["server"],
  streamsOf: WeakMap<http2.Http2Session, Set<http2.Http2Stream>>,
): void {
  const requestMs = cfg.requestTimeoutSeconds * 1000;
  // A moment past the limit, so a handler ending its stream at the limit does so cleanly first.
  const lifeMs = cfg.maxStreamSeconds > 0 ? cfg.maxStreamSeconds * 1000 + 1000 : 0;
  const timed = requestMs > 0 || lifeMs > 0;
  if (!timed && cfg.idleTimeoutSeconds === 0) return;
  server.on("stream", (stream: http2.ServerHttp2Stream) => {
    const open = stream.session === undefined ? undefined : streamsOf.get(stream.session);
    open?.add(stream);
    let timer: NodeJS.Timeout | undefined;
    if (timed) {
      const cancel = () => {
        if (!stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
      };
      if (requestMs > 0 && (lifeMs === 0 || requestMs < lifeMs))
        timer = setTimeout(() => {
          // The client still owes part of its request: a stalled or trickled upload.
          if (stream.state.remoteClose !== 1) cancel();
          else if (lifeMs > 0) timer = setTimeout(cancel, lifeMs - requestMs).unref();
        }, requestMs).unref();
      else timer = setTimeout(cancel, lifeMs).unref();
    }
    if (timer === undefined && open === undefined) return;
    // "on", not "once": a stream closes once, and once's wrapper is a cost per call.
    stream.on("close", () => {
      if (timer !== undefined) clearTimeout(timer);
      open?.delete(stream);
    });
  });
  // HTTP/1.1 (allowHTTP1): a request whose body has not arrived in time loses its connection.
  if (requestMs > 0)
    server.on("request", (req: IncomingMessage | http2.Http2ServerRequest, res: Response) => {
      if (req.httpVersion.startsWith("2")) return;
      const timer = setTimeout(() => {
        if (!req.complete) req.socket.destroy();
      }, requestMs).unref();
      res.once("close", () => clearTimeout(timer));
    });
}

/** Build and start the server on the configured host and port (port 0 picks a free one). */
export async function startServer(app: App): Promise<TesseraServer> {
  const { server: cfg } = app.config;
  const tls = !cfg.insecurePlaintext;
  let draining = false;
  const handler = createRequestHandler(app, { tls, draining: () => draining });
  const settings: http2.Settings = {
    maxConcurrentStreams: cfg.maxConcurrentStreams,
    maxHeaderListSize: cfg.maxHeaderListSize,
  };
  let server: http2.Http2SecureServer | http2.Http2Server;
  const tlsOptions = async () => {
    const m = await loadTlsMaterial(cfg);
    return {
      ca: m.ca,
      cert: m.cert,
      key: m.key,
      ...(m.crl ? { crl: m.crl } : {}),
    };
  };
  if (tls) {
    server = http2.createSecureServer({
      ...(await tlsOptions()),
      allowHTTP1: true,
      requestCert: cfg.mtls !== "off",
      rejectUnauthorized: cfg.mtls === "require",
      settings,
      minVersion: "TLSv1.2",
      // A connection that never completes its handshake is idle too (Node's default: 120 s).
      ...(cfg.idleTimeoutSeconds > 0
        ? { handshakeTimeout: Math.min(cfg.idleTimeoutSeconds, 120) * 1000 }
        : {}),
    });
  } else {
    // Development only: h2c plus HTTP/1.1 on one port.
    server = http2.createServer({ settings, allowHTTP1: true } as http2.ServerOptions);
  }
  installTransport(server, handler);
  const connectionsFrom = boundConnections(server, cfg, tls);
  await new Promise<void>((resolve, reject) => {
    const fail = (err: Error) => reject(listenError(err, cfg));
    server.once("error", fail);
    server.listen(cfg.port, cfg.host, () => {
      server.off("error", fail);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const host = cfg.host === "0.0.0.0" || cfg.host === "::" ? "127.0.0.1" : cfg.host;
  const sessions = new Set<http2.Http2Session>();
  const sockets = new Set<import("node:net").Socket>();
  // Calls in flight, for a shutdown that waits for them: HTTP/2 streams (every call over
  // HTTP/2, unary ones answered on the stream included) and HTTP/1.1 requests.
  let inFlight = 0;
  let drained: (() => void) | undefined;
  const callEnded = () => {
    inFlight--;
    if (inFlight === 0) drained?.();
  };
  server.on("stream", (stream: http2.ServerHttp2Stream) => {
    inFlight++;
    stream.once("close", callEnded);
  });
  server.on("request", (req: IncomingMessage | http2.Http2ServerRequest, res: Response) => {
    if (req.httpVersion.startsWith("2")) return;
    inFlight++;
    res.once("close", callEnded);
  });
  server.on("session", (s: http2.Http2Session) => {
    sessions.add(s);
    s.once("close", () => sessions.delete(s));
  });
  server.on("connection", (socket: import("node:net").Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });
  // New handshakes get the new certificate, key, CA and CRL; established connections keep theirs.
  const reloadTls = async () => {
    if (tls)
      (server as http2.Http2SecureServer).setSecureContext({
        ...(await tlsOptions()),
        minVersion: "TLSv1.2",
      });
  };
  // Reload when the cert folder's files change (SIGHUP does the same, see `tessera serve`).
  const tlsWatch = tls
    ? watchTlsFiles(
        cfg.certDir,
        () => {
          reloadTls().then(
            () => app.logger.info({ dir: cfg.certDir }, "TLS material reloaded after a file change"),
            (err: Error) =>
              app.logger.error({ err: err.message }, "TLS reload failed; keeping the previous certificates"),
          );
        },
        {
          onError: (err) =>
            app.logger.warn({ err: err.message }, "cannot watch the cert folder; reload with SIGHUP"),
        },
      )
    : null;
  return {
    server,
    port,
    // An IPv6 literal is bracketed in a URL (RFC 3986).
    url: `${tls ? "https" : "http"}://${host.includes(":") ? `[${host}]` : host}:${port}`,
    reloadTls,
    connectionsFrom,
    async close(graceMs = 2000, drainDelayMs = 0) {
      draining = true;
      if (drainDelayMs > 0) await new Promise((r) => setTimeout(r, drainDelayMs));
      tlsWatch?.close();
      // WatchRevocations streams never end by themselves: they end now, cleanly (OK), and
      // their clients resume on another instance from their cursor.
      app.revocations.drain();
      // No new connections from here: the listening socket is closed at once.
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      // HTTP/2 sessions get GOAWAY (no new streams; open ones finish), then close when empty.
      for (const s of sessions) {
        if (s.destroyed) continue;
        s.goaway(http2.constants.NGHTTP2_NO_ERROR);
        s.close();
      }
      if (inFlight > 0)
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, graceMs);
          drained = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      const cut = inFlight;
      // What is left: calls past the grace period, idle HTTP/1.1 keep-alive connections
      // (server.close waits for those for ever), and peers that never read their GOAWAY.
      for (const socket of sockets) socket.destroy();
      await closed;
      return { cut };
    },
  };
}
