/**
 * Certificate tooling: the development CA, client certificate minting, CRLs and fingerprints.
 * Re-exported by name so callers can import from `certs/index.js` without reaching into `dev-ca.js`.
 */
export {
  certificateFingerprint,
  createCertificateAuthority,
  createClientCertificate,
  type EnsureCertsResult,
  ensureDevCertificates,
  writeCrl,
} from "./dev-ca.js";
