// The CA certificates client certificates must chain to, and the check that a certificate
// still does after the CA was replaced under a connection that was verified against the old one.
import { X509Certificate } from "node:crypto";

/**
 * The certificates of one ca.crt (a PEM bundle), as loaded. The server swaps the object only when
 * the certificates change, so its identity is the trust's generation: a connection remembers the
 * object it was verified against and compares it, once per request, with the current one.
 */
export interface TrustAnchors {
  /** The bundle's certificates' SHA-256 fingerprints, in order: equal bundles, equal key. */
  readonly key: string;
  readonly certs: readonly X509Certificate[];
}

const PEM_CERT = /-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g;
/** Longer chains than this are not followed: OpenSSL's default depth is 100, real ones have 2 or 3 links. */
const MAX_CHAIN = 10;

/**
 * The trust anchors of a PEM ca.crt.
 * @throws Error when it holds no certificate that parses
 */
export function trustAnchors(caPem: Buffer): TrustAnchors {
  const certs = (caPem.toString("latin1").match(PEM_CERT) ?? []).map((pem) => new X509Certificate(pem));
  if (certs.length === 0) throw new Error("ca.crt holds no certificate");
  return { key: certs.map((c) => c.fingerprint256).join(","), certs };
}

function validAt(cert: X509Certificate, now: number): boolean {
  return Date.parse(cert.validFrom) <= now && now <= Date.parse(cert.validTo);
}

function signed(cert: X509Certificate, by: X509Certificate): boolean {
  return cert.checkIssued(by) && cert.verify(by.publicKey);
}

/**
 * Whether `chain` (the peer's certificate first, then the intermediates it sent, each issued by
 * the next) leads to one of `anchors`: every link's issuer and signature checked, every
 * certificate on the way valid at `now`. An anchor in the chain itself counts as reached.
 */
export function chainsTo(
  chain: readonly X509Certificate[],
  anchors: TrustAnchors,
  now = Date.now(),
): boolean {
  const fingerprints = new Set(anchors.certs.map((a) => a.fingerprint256));
  for (let i = 0; i < Math.min(chain.length, MAX_CHAIN); i++) {
    const cert = chain[i]!;
    if (i > 0 && fingerprints.has(cert.fingerprint256)) return true;
    if (!validAt(cert, now)) return false;
    if (anchors.certs.some((a) => validAt(a, now) && signed(cert, a))) return true;
    const next = chain[i + 1];
    if (next === undefined || !next.ca || !signed(cert, next)) return false;
  }
  return false;
}

/** A certificate's notAfter in ms since the epoch; one that does not parse counts as passed. */
function endOf(cert: X509Certificate): number {
  const end = Date.parse(cert.validTo);
  return Number.isNaN(end) ? Number.NEGATIVE_INFINITY : end;
}

/**
 * The earliest notAfter (ms since the epoch) on the path {@link chainsTo} follows from `chain`
 * to `anchors`, by issuer and signature, or -Infinity when there is none: what a verification
 * rests on, not whatever else the peer sent (a certificate named like an anchor but signed by
 * nobody it trusts would otherwise stand in for the anchor's nearer end).
 */
export function chainEnd(chain: readonly X509Certificate[], anchors: TrustAnchors): number {
  const fingerprints = new Set(anchors.certs.map((a) => a.fingerprint256));
  let end = Number.POSITIVE_INFINITY;
  for (let i = 0; i < Math.min(chain.length, MAX_CHAIN); i++) {
    const cert = chain[i]!;
    end = Math.min(end, endOf(cert));
    if (i > 0 && fingerprints.has(cert.fingerprint256)) return end;
    // Several anchors may sign it (a CA re-issued with the same key): a new handshake holds while any does.
    let anchorEnd = Number.NEGATIVE_INFINITY;
    for (const a of anchors.certs) if (signed(cert, a)) anchorEnd = Math.max(anchorEnd, endOf(a));
    if (anchorEnd > Number.NEGATIVE_INFINITY) return Math.min(end, anchorEnd);
    const next = chain[i + 1];
    if (next === undefined || !next.ca || !signed(cert, next)) return Number.NEGATIVE_INFINITY;
  }
  return Number.NEGATIVE_INFINITY;
}
