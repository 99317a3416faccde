import type { IncomingMessage } from "node:http";
import type { TLSSocket } from "node:tls";
import type { HeaderSource } from "../auth/credentials.js";
import type { PeerCertificateInfo } from "../auth/principal.js";
import { normaliseSerial } from "../certs/serial.js";
import { chainEnd, chainsTo, type TrustAnchors } from "../certs/trust-anchors.js";
import { createClientIpResolver, createTrustedProxyCheck } from "../client-ip.js";
import { type Clock, systemClock } from "../clock.js";
import type { Config } from "../config.js";
import type { RequestState } from "../context.js";
import { uuidV7 } from "../storage/uuid-v7.js";
import type { NodeRequest as Request } from "../transport/stream-server.js";
import { peerChain } from "./handshake-ends.js";
import { NO_PEER_TRUST, type PeerTrust } from "./peer-trust.js";

/**
 * The facts of a request, gathered once when it arrives and attached to it for the
 * transport's callbacks, admission and the interceptors: its id, the client's address, the
 * client certificate (see `RequestState`).
 */

const REQUEST_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
const kState = Symbol("tessera.requestState");

/** The request state the handler attached to an RPC request before handing it to the adapter. */
export function stateOf(req: Request): RequestState {
  return (req as unknown as Record<symbol, RequestState>)[kState]!;
}

const kCloseConnection = Symbol("tessera.closeConnection");

/**
 * Whether the answer to `req` must end its HTTP/1.1 connection (`Connection: close`, then the
 * socket closed once the answer is written): its certificate authenticates nothing any more
 * under mTLS required, HTTP/1.1's equivalent of the GOAWAY an HTTP/2 connection gets.
 */
export function closesConnection(req: Request): boolean {
  return (req as unknown as Record<symbol, boolean | undefined>)[kCloseConnection] === true;
}

/** Node's incoming headers read as fetch Headers would read them (repeats joined with ", "). */
export function nodeHeaderSource(headers: IncomingMessage["headers"]): HeaderSource {
  return {
    get(name) {
      const v = headers[name];
      return v === undefined ? null : typeof v === "string" ? v : v.join(", ");
    },
  };
}

/**
 * What the server knows of a connection's handshake: the CA it verified the client
 * certificate against (peer-trust.ts `stampConnections`) and the end of the chain it verified
 * (handshake-ends.ts). Either may not know a connection: undefined.
 */
export interface HandshakeFacts {
  anchors?: (socket: TLSSocket) => TrustAnchors | undefined;
  end?: (socket: TLSSocket) => number | undefined;
}

/** A connection's client certificate, as parsed once, and as it stands against the current CA. */
interface ConnectionCertificate {
  readonly parsed: PeerCertificateInfo;
  readonly serial: string;
  /** The anchors `info` and `notAfter` were last decided against: the handshake's, then each reloaded CA's. */
  anchors: TrustAnchors | null | undefined;
  /** `parsed` (with `notAfter`) while it chains to `anchors`, else null (it authenticates nothing). */
  info: PeerCertificateInfo | null;
  /**
   * The earliest notAfter of the chain to `anchors` (the peer's certificate, the intermediates
   * on the way and the CA), in ms since the epoch: past it the certificate authenticates
   * nothing, however long its connection stays open.
   */
  notAfter: number;
  /**
   * A resumed session whose full handshake is not remembered (see handshake-ends.ts): it
   * authenticates nothing, but is not cut, since its client would resume the same ticket.
   */
  endUnknown: boolean;
}

function parseCertificate(
  socket: TLSSocket,
  handshake: HandshakeFacts,
  current: TrustAnchors | null,
): ConnectionCertificate | null {
  // authorizationError too: a failed verification after the first one leaves `authorized` set.
  if (!socket.authorized || socket.authorizationError) return null;
  const cert = socket.getPeerCertificate(false);
  if (!cert?.raw) return null;
  const hex = cert.fingerprint256.replace(/:/g, "").toLowerCase();
  const sanUris = (cert.subjectaltname ?? "")
    .split(/,\s*/)
    .filter((s) => s.startsWith("URI:"))
    .map((s) => s.slice(4));
  const cn = cert.subject?.CN;
  const parsed: PeerCertificateInfo = {
    sha256Fingerprint: hex,
    thumbprint: Buffer.from(hex, "hex").toString("base64url"),
    commonName: Array.isArray(cn) ? (cn[0] ?? null) : (cn ?? null),
    sanUris,
  };
  const anchors = handshake.anchors?.(socket);
  // Decided at the handshake (handshake-ends.ts), a resumed session's from the full one that
  // created it. Else read here on the path to the anchors (see chainEnd), except for a resumed
  // session: Node keeps none of its first handshake's intermediates, so its end is unknown.
  let notAfter = handshake.end?.(socket);
  const resumed = socket.isSessionReused();
  if (notAfter === undefined) {
    const trustedBy = anchors ?? current;
    notAfter = trustedBy && !resumed ? chainEnd(peerChain(socket), trustedBy) : Number.NEGATIVE_INFINITY;
  }
  return {
    parsed,
    serial: normaliseSerial(cert.serialNumber),
    anchors,
    info: { ...parsed, notAfter },
    notAfter,
    endUnknown: resumed && notAfter === Number.NEGATIVE_INFINITY,
  };
}

/**
 * The caller's request id when it is a sane one, else a new one: time-ordered, because the
 * audit table indexes `request_id` and a random id put every audited row on its own index page.
 */
export function requestIdOf(req: Request): string {
  const incoming = req.headers["x-request-id"];
  return typeof incoming === "string" && REQUEST_ID_RE.test(incoming) ? incoming : uuidV7();
}

/**
 * The function that attaches a request's state (read back by {@link stateOf}): the client's
 * address (through trusted proxies), whether it came through one, and its certificate, held to
 * the current {@link PeerTrust}. `handshake` tells what the connection's handshake verified
 * (see {@link HandshakeFacts}). `clock` is the one a certificate's expiry is read on (the app's).
 */
export function createStateAttacher(
  config: Config,
  tls: boolean,
  trust: () => PeerTrust = () => NO_PEER_TRUST,
  handshake: HandshakeFacts = {},
  clock: Clock = systemClock,
): (req: Request, requestId?: string) => void {
  const certCache = new WeakMap<object, ConnectionCertificate | null>();

  function peerCertificate(req: Request): PeerCertificateInfo | null {
    if (!tls || config.server.mtls === "off") return null;
    // One parse per connection: the certificate cannot change within it.
    const owner: object = "stream" in req ? (req.stream.session ?? req.socket) : req.socket;
    let cert = certCache.get(owner);
    const current = trust();
    if (cert === undefined) {
      const socket = req.socket as TLSSocket;
      cert = parseCertificate(socket, handshake, current.anchors);
      certCache.set(owner, cert);
    }
    if (cert === null) return null;
    // What it is trusted by can change: the handshake chained it to the CA of its time, and a
    // CA replaced since takes effect on this request, on this connection too. One compare
    // unless it was replaced; then one chain check per connection per CA.
    if (cert.anchors !== current.anchors) {
      const anchors = current.anchors;
      const chain = peerChain(req.socket as TLSSocket);
      cert.anchors = anchors;
      cert.endUnknown = false;
      cert.notAfter = anchors !== null ? chainEnd(chain, anchors) : Number.NEGATIVE_INFINITY;
      cert.info =
        anchors !== null && chainsTo(chain, anchors, clock())
          ? { ...cert.parsed, notAfter: cert.notAfter }
          : null;
    }
    // The handshake checked the chain's validity at its time only (notBefore included, so
    // only notAfter can pass later): a connection kept open must not outlive it. So can its
    // revocation: the handshake checked the CRL of its time, and a CRL reloaded since takes
    // effect on this request, on this connection too.
    const revoked = current.revoked.size > 0 && current.revoked.has(cert.serial);
    if (clock() <= cert.notAfter && !revoked && cert.info !== null) return cert.info;
    // Cut only a certificate that expired, was revoked or is no longer trusted: its client
    // reconnects with a renewed one. One refused for an unknown end alone just gets the 401.
    const unknownOnly = cert.endUnknown && !revoked && cert.info !== null;
    if (config.server.mtls === "require" && !unknownOnly) closeGracefully(req);
    return null;
  }

  /**
   * With mTLS required, a connection whose certificate authenticates nothing any more can serve
   * nothing: over HTTP/2, GOAWAY once the calls in flight (this one included) are answered, so
   * that its client reconnects with its renewed certificate; over HTTP/1.1, this answer says
   * `Connection: close` and the socket is closed once it is written (see {@link closesConnection}):
   * no further request on it, as none could be served.
   */
  function closeGracefully(req: Request): void {
    if (!("stream" in req)) {
      if (req.httpVersionMajor === 1) (req as unknown as Record<symbol, boolean>)[kCloseConnection] = true;
      return;
    }
    const session = req.stream.session;
    // close() sends GOAWAY and ends the session once its streams have.
    if (session && !session.closed && !session.destroyed) session.close();
  }

  const resolveIp = createClientIpResolver(config.server);
  const isProxy = createTrustedProxyCheck(config.server);
  /** The connection's direct peer address. */
  function peerOf(req: Request): string | undefined {
    // HTTP/2: the session's socket (one per connection), not req.socket (a Proxy made per stream).
    const socket = "stream" in req ? (req.stream.session?.socket ?? req.socket) : req.socket;
    return socket.remoteAddress;
  }

  /** Attach the request's state (read back by `stateOf`) for the adapter's callbacks and the interceptors. */
  return function attachState(req: Request, requestId: string = requestIdOf(req)): void {
    const peer = peerOf(req);
    const state: RequestState = {
      requestId,
      ip: resolveIp(peer, req.headers),
      certificate: peerCertificate(req),
      principal: null,
      startedAt: performance.now(),
    };
    if (isProxy(peer)) state.viaProxy = true;
    if (state.certificate !== null) state.certificateHolds = () => peerCertificate(req) !== null;
    (req as unknown as Record<symbol, RequestState>)[kState] = state;
  };
}
