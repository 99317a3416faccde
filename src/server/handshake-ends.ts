import { X509Certificate } from "node:crypto";
import type { Server } from "node:net";
import type { DetailedPeerCertificate, TLSSocket } from "node:tls";
import { LRUCache } from "lru-cache";
import { chainEnd, type TrustAnchors } from "../certs/trust-anchors.js";

/**
 * Until when each TLS connection's client certificate chains to the CA, decided once at its
 * handshake: the earliest notAfter of the path to the anchors (the certificate, the
 * intermediates the client sent, the CA). A resumed session's client sends no certificate and
 * Node keeps none of the first handshake's intermediates, so its end is the one remembered
 * from the full handshake that created the session.
 */

/**
 * Leaf certificates remembered: a resumption finding none authenticates nothing, so this
 * bounds how many distinct client certificates can resume at once, not who may connect.
 */
const MAX_REMEMBERED = 50_000;

/** The peer's certificate and the issuers it sent (and its handshake found), leaf first. */
export function peerChain(socket: TLSSocket): X509Certificate[] {
  const chain: X509Certificate[] = [];
  let cert: DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
  while (cert?.raw && chain.length < 16) {
    chain.push(new X509Certificate(cert.raw));
    if (cert.issuerCertificate === cert) break;
    cert = cert.issuerCertificate;
  }
  return chain;
}

/** The raw socket a server-side TLS socket wraps (Node sets `_parent` on every one). */
export function rawSocketOf(socket: TLSSocket): object | undefined {
  return (socket as unknown as { _parent?: object | null })._parent ?? undefined;
}

/**
 * The ends of verified leaves, by CA generation and SHA-256 fingerprint. Ticket keys are per
 * process and change with every TLS reload (a new secure context), so a session resumed here
 * was created by a full handshake this map saw, under anchors no older than the current ones.
 * Keyed by the generation too, not only replaced by it: a handshake accepted before a reload
 * may end after it, and must not erase what the new generation's handshakes remembered.
 */
export function createVerifiedEnds(max = MAX_REMEMBERED) {
  const ends = new LRUCache<string, number>({ max });
  const generations = new WeakMap<TrustAnchors, number>();
  let nextGeneration = 0;
  const keyOf = (fingerprint: string, anchors: TrustAnchors): string => {
    let generation = generations.get(anchors);
    if (generation === undefined) {
      generation = nextGeneration++;
      generations.set(anchors, generation);
    }
    return `${generation}|${fingerprint}`;
  };
  return {
    /**
     * Remember a full handshake's end. The latest of a leaf's ends under the same anchors
     * wins: each is a path the handshake checked, and a leaf re-sent with a renewed
     * intermediate still chains until the later one.
     */
    remember(fingerprint: string, anchors: TrustAnchors, end: number): void {
      const key = keyOf(fingerprint, anchors);
      const known = ends.get(key);
      if (known === undefined || known < end) ends.set(key, end);
    },
    /** The end remembered for a leaf under `anchors`; -Infinity (authenticates nothing) when none. */
    recall(fingerprint: string, anchors: TrustAnchors): number {
      return ends.get(keyOf(fingerprint, anchors)) ?? Number.NEGATIVE_INFINITY;
    },
  };
}

/**
 * Decide, for every connection the TLS server accepts with a verified client certificate,
 * the end of its chain (see above), after `anchorsOf` stamped it (see peer-trust.ts
 * `stampConnections`). Returns the lookup for a request's socket: undefined when the
 * connection was not decided here (then the caller decides).
 */
export function trackHandshakeEnds(
  server: Server,
  anchorsOf: (socket: TLSSocket) => TrustAnchors | undefined,
  verified = createVerifiedEnds(),
): (socket: TLSSocket) => number | undefined {
  const decided = new WeakMap<object, number>();
  // Registered after the server's own listener, and run in the same turn as it: before the
  // connection's first request is read.
  server.on("secureConnection", (socket: TLSSocket) => {
    // authorizationError too: see request-facts.ts parseCertificate.
    if (!socket.authorized || socket.authorizationError) return;
    const raw = rawSocketOf(socket);
    const anchors = anchorsOf(socket);
    const leaf = socket.getPeerCertificate(false);
    if (raw === undefined || anchors === undefined || !leaf?.raw) return;
    const fingerprint = leaf.fingerprint256;
    if (socket.isSessionReused()) {
      decided.set(raw, verified.recall(fingerprint, anchors));
      return;
    }
    const end = chainEnd(peerChain(socket), anchors);
    decided.set(raw, end);
    if (end > Number.NEGATIVE_INFINITY) verified.remember(fingerprint, anchors, end);
  });
  return (socket) => {
    const raw = rawSocketOf(socket);
    return raw ? decided.get(raw) : undefined;
  };
}
