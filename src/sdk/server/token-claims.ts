// The claims of Tessera's access tokens the SDK decides by, named in one place: the SDK
// ships on its own and never imports Tessera's sources, which name them for the server.

/** RFC 8176's authentication methods claim. */
export const AMR_CLAIM = "amr";

/**
 * The `amr` value of a machine access token whose authority came from a client certificate
 * (a binding of it or its SAN URIs); Tessera also writes the certificate's SAN URIs
 * (`cert_san_uris`) and thumbprint (`cnf`) into such a token.
 */
export const MTLS_AMR = "mtls";

/**
 * Whether an access token's payload says its authority came from a client certificate.
 * Tessera refuses such a token once the certificate resolves to another machine user (a
 * binding taken, a SAN contest), and no revocation event names the one that lost it: only
 * Tessera can answer for it, on every call. Read from a payload not yet vouched for too, as
 * it can only make a token's check stricter.
 */
export function certificateAuthority(payload: object): boolean {
  const amr = (payload as Record<string, unknown>)[AMR_CLAIM];
  if (amr === undefined) return false;
  return amr === MTLS_AMR || (Array.isArray(amr) && amr.includes(MTLS_AMR));
}
