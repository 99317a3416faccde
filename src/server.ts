import type { IncomingMessage } from "node:http";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import type { TLSSocket } from "node:tls";
import type { App } from "./app.js";
import type { TrustAnchors } from "./certs/trust-anchors.js";
import { watchTlsFiles } from "./certs/watch.js";
import { listenError } from "./listen-check.js";
import { ageConnections } from "./server/connection-age.js";
import { boundConnections } from "./server/connection-limits.js";
import { trackHandshakeEnds } from "./server/handshake-ends.js";
import { NO_PEER_TRUST, type PeerTrust, stampConnections } from "./server/peer-trust.js";
import { createRequestHandler, MAX_HTTP1_HEADERS } from "./server/request-handler.js";
import { loadTlsMaterial, type OpenKeyPolicy, tlsStatus } from "./server/tls-material.js";
import { installTransport } from "./transport/index.js";
import type { NodeResponse as Response } from "./transport/stream-server.js";

export { preflight, type TlsMaterial } from "./server/tls-material.js";

/*
 * The Tessera server on its port: HTTP/2 over TLS (h2c in development) with HTTP/1.1, built,
 * listening, reloading its certificates and shutting down. Its parts are in src/server/:
 * tls-material.ts (the cert folder), connection-limits.ts (what a connection and a stream may
 * hold), connection-age.ts (when a connection is recycled), request-handler.ts (what every request gets before the transport serves the RPC).
 */

/** A listening Tessera server. */
export interface TesseraServer {
  server: http2.Http2SecureServer | http2.Http2Server;
  port: number;
  /** e.g. https://127.0.0.1:50052: an address to dial (loopback for a wildcard host). */
  url: string;
  /** The address bound, e.g. 0.0.0.0:50052 or [::]:50052. */
  listen: string;
  /** Replace certificate, key, CA and CRL for new handshakes; open connections stay. */
  reloadTls(): Promise<void>;
  /**
   * Connections open from a peer address, as counted for `server.maxConnectionsPerIp` (0
   * when it is off): for an IPv6 address, from its whole /64.
   */
  connectionsFrom(ip: string): number;
  /**
   * HTTP/2 streams open from a peer address, as counted for `server.maxOpenStreamsPerIp` (0
   * when it is off): for an IPv6 address, from its whole /64.
   */
  openStreamsFrom(ip: string): number;
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

/** Build and start the server on the configured host and port (port 0 picks a free one). */
export async function startServer(app: App): Promise<TesseraServer> {
  const { server: cfg } = app.config;
  const tls = !cfg.insecurePlaintext;
  // The CA and the CRL loaded last: every request's certificate is held to them, so that a
  // reloaded CA or CRL takes effect on connections already open (their handshake predates it).
  let trust: PeerTrust = NO_PEER_TRUST;
  let handshakeAnchors: ((socket: TLSSocket) => TrustAnchors | undefined) | undefined;
  let handshakeEnd: ((socket: TLSSocket) => number | undefined) | undefined;
  const handler = createRequestHandler(app, {
    tls,
    // /ready follows the same shutdown state as grpc.health.v1.Health.
    draining: () => app.serving.draining,
    peerTrust: () => trust,
    handshake: {
      anchors: (socket) => handshakeAnchors?.(socket),
      end: (socket) => handshakeEnd?.(socket),
    },
  });
  const settings: http2.Settings = {
    maxConcurrentStreams: cfg.maxConcurrentStreams,
    maxHeaderListSize: cfg.maxHeaderListSize,
  };
  let server: http2.Http2SecureServer | http2.Http2Server;
  const tlsOptions = async (openKey?: OpenKeyPolicy) => {
    const m = await loadTlsMaterial(cfg, openKey);
    // The same CA keeps its anchors object, so that a reload that leaves it (a new CRL, a new
    // server certificate) re-verifies no connection's certificate.
    const anchors = trust.anchors?.key === m.anchors.key ? trust.anchors : m.anchors;
    return {
      options: { ca: m.ca, cert: m.cert, key: m.key, ...(m.crl ? { crl: m.crl } : {}) },
      trust: { anchors, revoked: m.revoked },
      notAfter: m.notAfter,
    };
  };
  if (tls) {
    const material = await tlsOptions();
    trust = material.trust;
    tlsStatus.certificateNotAfter = material.notAfter ?? 0;
    server = http2.createSecureServer({
      ...material.options,
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
  // Read by Node's HTTP/1.1 parser for each connection the server takes (allowHTTP1).
  (server as unknown as { maxHeadersCount: number }).maxHeadersCount = MAX_HTTP1_HEADERS;
  if (tls) {
    handshakeAnchors = stampConnections(server, () => trust.anchors);
    // After the stamp: a handshake's chain is read against the anchors it was verified by.
    if (cfg.mtls !== "off") handshakeEnd = trackHandshakeEnds(server, handshakeAnchors);
    // A TLS 1.2 client may renegotiate (HTTP/1.1; HTTP/2 forbids it) and present another
    // certificate: Node keeps the socket authorized by the first handshake even when the new
    // one verifies nothing. No client of this service needs renegotiation.
    server.on("secureConnection", (socket: TLSSocket) => socket.disableRenegotiation());
  }
  // Calls in flight, for a shutdown that waits for them: HTTP/2 streams (every call over
  // HTTP/2, unary ones answered on the stream included) and HTTP/1.1 requests.
  let inFlight = 0;
  let drained: (() => void) | undefined;
  const callEnded = () => {
    inFlight--;
    if (inFlight === 0) drained?.();
  };
  // Counted in before the transport's listener runs (the bounds', which count it out, are
  // prepended): a transport that threw would otherwise leave a stream counted out only.
  server.on("stream", () => {
    inFlight++;
  });
  installTransport(server, handler);
  // A stream's close is told through the bounds' one "close" listener: a third listener on it
  // grew the pair events.js keeps them in, a copy per call that a pretenured pair kept alive.
  const { connectionsFrom, openStreamsFrom, openStreamsOf } = boundConnections(
    server,
    cfg,
    tls,
    { logger: app.logger, clock: app.clock },
    callEnded,
  );
  // Recycled at server.maxConnectionAgeSeconds (connection-age.ts): GOAWAY, then cut after the grace.
  ageConnections(server, cfg, tls, openStreamsOf);
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
  // New handshakes get the new certificate, key, CA and CRL; established connections keep
  // theirs, but a certificate the new CRL revokes, or that no longer chains to the new CA, no
  // longer authenticates any request. Context and trust change together, synchronously (see
  // peer-trust.ts stampConnections).
  // A key open to others is warned about, not refused (see OpenKeyPolicy): the start refused it.
  const reloadTls = async () => {
    if (!tls) return;
    try {
      const material = await tlsOptions((problem) =>
        app.logger.warn(`TLS reload: loaded, but a restart will refuse it: ${problem}`),
      );
      (server as http2.Http2SecureServer).setSecureContext({ ...material.options, minVersion: "TLSv1.2" });
      trust = material.trust;
      tlsStatus.certificateNotAfter = material.notAfter ?? 0;
    } catch (err) {
      tlsStatus.reloadFailures++;
      throw err;
    }
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
    url: `${tls ? "https" : "http"}://${hostPort(host, port)}`,
    listen: hostPort(cfg.host, port),
    reloadTls,
    connectionsFrom,
    openStreamsFrom,
    async close(graceMs = 2000, drainDelayMs = 0) {
      app.serving.drain();
      if (drainDelayMs > 0) await new Promise((r) => setTimeout(r, drainDelayMs));
      tlsWatch?.close();
      // WatchRevocations streams never end by themselves: they end now, cleanly (OK), and
      // their clients resume on another instance from their cursor.
      app.revocations.drain();
      // Health watches likewise, having said NOT_SERVING since the drain began.
      app.serving.close();
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

/** `host:port`, an IPv6 literal bracketed (RFC 3986). */
function hostPort(host: string, port: number): string {
  return `${host.includes(":") ? `[${host}]` : host}:${port}`;
}
