/**
 * Certificate tooling: the development CA, client certificate minting, CRLs and fingerprints.
 * Re-exported by name so callers can import from `certs/index.js` without knowing which module holds each.
 */
export { writeCrl } from "./crl.js";
export {
  createCertificateAuthority,
  createClientCertificate,
  type EnsureCertsResult,
  ensureDevCertificates,
} from "./dev-ca.js";
export { certificateFingerprint } from "./issuing.js";
