import type { Server } from "node:net";
import type { TLSSocket } from "node:tls";
import type { TrustAnchors } from "../certs/trust-anchors.js";
import { rawSocketOf } from "./handshake-ends.js";

/**
 * What a client certificate is held to on every request, beyond its handshake: the CA
 * certificates of the loaded ca.crt (a new object only when they change, see
 * certs/trust-anchors.ts) and the serials the loaded CRL revokes. The server swaps the whole
 * snapshot when it reloads its TLS material.
 */
export interface PeerTrust {
  /** Null without TLS. */
  readonly anchors: TrustAnchors | null;
  readonly revoked: ReadonlySet<string>;
}

/** The trust of a server that has loaded no TLS material. */
export const NO_PEER_TRUST: PeerTrust = { anchors: null, revoked: new Set() };

/**
 * Remember, for every connection the TLS server accepts, the trust anchors current at that
 * moment: the ones its handshake verifies the client certificate against, since Node's TLS
 * server gives a new socket the secure context current when it accepts it, and `reloadTls`
 * swaps context and anchors in one synchronous step. A connection accepted before a CA
 * replacement but asking nothing until after is so known to be verified by the old CA.
 * Returns the lookup for a request's socket; undefined when unknown (then re-verify).
 */
export function stampConnections(
  server: Server,
  current: () => TrustAnchors | null,
): (socket: TLSSocket) => TrustAnchors | undefined {
  const accepted = new WeakMap<object, TrustAnchors>();
  // Registered after the TLS server's own listener (added when it was constructed), which
  // has created the TLS socket from this raw one by the time this runs.
  server.on("connection", (raw: object) => {
    const anchors = current();
    if (anchors !== null) accepted.set(raw, anchors);
  });
  return (socket) => {
    const raw = rawSocketOf(socket);
    return raw ? accepted.get(raw) : undefined;
  };
}
