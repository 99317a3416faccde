// Machine access tokens whose authority came from a client certificate alone: what marks
// them and how the certificate they were issued to is read back from their claims.
import { TesseraError } from "../errors.js";
import type { AccessTokenClaims } from "./jwt.js";
import type { PeerCertificateInfo } from "./principal.js";

/**
 * The claims of a machine access token issued to a machine user its client certificate alone
 * authenticated (mTLS): `amr` (RFC 8176) holding `mtls` marks it, and `cert_san_uris` carries
 * the certificate's SAN URIs as Tessera read them. With the fingerprint in `cnf` they are the
 * inputs of machineOfCertificate, so every use re-decides the certificate's owner from the
 * token alone. The SDK does not import the server: its copy of these names is in
 * src/sdk/server/token-claims.ts, and the two must change together.
 */
export const CERTIFICATE_TOKEN_CLAIMS = Object.freeze({
  amr: "amr",
  mtls: "mtls",
  sanUris: "cert_san_uris",
} as const);

/** What decides a certificate's machine user (machineOfCertificate): its fingerprint and SAN URIs. */
export type CertificateIdentity = Pick<PeerCertificateInfo, "sha256Fingerprint" | "sanUris">;

const MALFORMED = "access token's certificate claims are malformed";

// Verified claims are kept as one object per token (jwt.ts), so each is parsed once.
const parsed = new WeakMap<AccessTokenClaims, CertificateIdentity | null>();

/**
 * The certificate a marked token was issued to, or null when the token is not marked (no
 * `amr`, or one without `mtls`: it stays as it was, bound by `cnf` alone).
 * @throws TesseraError TOKEN_INVALID when marked without a `cnf` thumbprint or a string array `cert_san_uris`
 */
export function grantingCertificateOf(claims: AccessTokenClaims): CertificateIdentity | null {
  let found = parsed.get(claims);
  if (found === undefined) {
    found = parse(claims);
    parsed.set(claims, found);
  }
  return found;
}

function parse(claims: AccessTokenClaims): CertificateIdentity | null {
  const amr: unknown = claims[CERTIFICATE_TOKEN_CLAIMS.amr];
  if (amr === undefined) return null;
  if (!isStringArray(amr)) throw new TesseraError("TOKEN_INVALID", MALFORMED);
  if (!amr.includes(CERTIFICATE_TOKEN_CLAIMS.mtls)) return null;
  const sanUris: unknown = claims[CERTIFICATE_TOKEN_CLAIMS.sanUris];
  const thumbprint = claims.cnf?.["x5t#S256"];
  if (typeof thumbprint !== "string" || !isStringArray(sanUris))
    throw new TesseraError("TOKEN_INVALID", MALFORMED);
  // The thumbprint is the SHA-256 the fingerprint is the hex of (RFC 8705 x5t#S256).
  const digest = Buffer.from(thumbprint, "base64url");
  if (digest.length !== 32 || digest.toString("base64url") !== thumbprint)
    throw new TesseraError("TOKEN_INVALID", MALFORMED);
  return Object.freeze({ sha256Fingerprint: digest.toString("hex"), sanUris: Object.freeze([...sanUris]) });
}

function isStringArray(value: unknown): value is string[] {
  return Array.isArray(value) && value.every((v) => typeof v === "string");
}
