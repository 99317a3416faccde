import { X509Certificate } from "node:crypto";
import type { IncomingMessage } from "node:http";
import type { DetailedPeerCertificate, TLSSocket } from "node:tls";
import type { HeaderSource } from "../auth/credentials.js";
import type { PeerCertificateInfo } from "../auth/principal.js";
import { normaliseSerial } from "../certs/serial.js";
import { chainEnd, chainsTo, earliestEnd, type TrustAnchors } from "../certs/trust-anchors.js";
import { createClientIpResolver, createTrustedProxyCheck } from "../client-ip.js";
import { type Clock, systemClock } from "../clock.js";
import type { Config } from "../config.js";
import type { RequestState } from "../context.js";
import { uuidV7 } from "../storage/uuid-v7.js";
import type { NodeRequest as Request } from "../transport/stream-server.js";
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

/** Node's incoming headers read as fetch Headers would read them (repeats joined with ", "). */
export function nodeHeaderSource(headers: IncomingMessage["headers"]): HeaderSource {
  return {
    get(name) {
      const v = headers[name];
      return v === undefined ? null : typeof v === "string" ? v : v.join(", ");
    },
  };
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
}

function parseCertificate(
  socket: TLSSocket,
  anchors: TrustAnchors | undefined,
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
  // The chain Node reports follows issuer names through what the peer sent, not the path the
  // handshake verified: its end is read on the path to the anchors (see chainEnd).
  const trustedBy = anchors ?? current;
  const chain = peerChain(socket);
  let notAfter = trustedBy ? chainEnd(chain, trustedBy) : Number.NEGATIVE_INFINITY;
  // A resumed session's client sent no certificate: Node knows the leaf (kept in the session)
  // and the issuers the store has, not the intermediates of the first handshake, which
  // verified them. Nothing in it comes from the client, so its ends are taken as they are.
  if (notAfter === Number.NEGATIVE_INFINITY && socket.isSessionReused()) notAfter = earliestEnd(chain);
  return {
    parsed,
    serial: normaliseSerial(cert.serialNumber),
    anchors,
    info: { ...parsed, notAfter },
    notAfter,
  };
}

/** The peer's certificate and the issuers it sent (and its handshake found), leaf first. */
function peerChain(socket: TLSSocket): X509Certificate[] {
  const chain: X509Certificate[] = [];
  let cert: DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
  while (cert?.raw && chain.length < 16) {
    chain.push(new X509Certificate(cert.raw));
    if (cert.issuerCertificate === cert) break;
    cert = cert.issuerCertificate;
  }
  return chain;
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
 * the current {@link PeerTrust}. `handshakeAnchors` names the CA a connection's handshake
 * verified its certificate against (see peer-trust.ts `stampConnections`). `clock` is the one
 * a certificate's expiry is read on (the app's).
 */
export function createStateAttacher(
  config: Config,
  tls: boolean,
  trust: () => PeerTrust = () => NO_PEER_TRUST,
  handshakeAnchors: (socket: TLSSocket) => TrustAnchors | undefined = () => undefined,
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
      cert = parseCertificate(socket, handshakeAnchors(socket), current.anchors);
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
      cert.notAfter = anchors !== null ? chainEnd(chain, anchors) : Number.NEGATIVE_INFINITY;
      cert.info =
        anchors !== null && chainsTo(chain, anchors, clock())
          ? { ...cert.parsed, notAfter: cert.notAfter }
          : null;
    }
    // The handshake checked the chain's validity at its time only (notBefore included, so
    // only notAfter can pass later): a connection kept open must not outlive it.
    if (clock() > cert.notAfter) return null;
    // So can its revocation: the handshake checked the CRL of its time, and a CRL reloaded
    // since takes effect on this request, on this connection too.
    const revoked = current.revoked;
    return revoked.size > 0 && revoked.has(cert.serial) ? null : cert.info;
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
