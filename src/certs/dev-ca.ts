// The development certificate set (CA, server certificate) a server creates when its folder has
// none, and the client certificates and foreign CAs minted from the command line and tests.
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { assertOwned } from "../private-files.js";
import { withFileLock } from "../storage/startup-lock.js";
import { exists, replaceFile, writeNewFile } from "./files.js";
import {
  CA_CERT,
  CA_KEY,
  CLIENT_CERT,
  CLIENT_KEY,
  certificateFingerprint,
  checkCommonName,
  checkSanUri,
  checkValidityDays,
  DEFAULT_CA_DAYS,
  DEFAULT_LEAF_DAYS,
  generateCa,
  issueLeaf,
  loadCa,
  type SanEntry,
  SERVER_CERT,
  SERVER_KEY,
  serverSan,
} from "./issuing.js";

/** Result of {@link ensureDevCertificates}. */
export interface EnsureCertsResult {
  /** `true` when at least one file was written, `false` when the folder was already complete. */
  created: boolean;
  /** The folder that was checked, as passed in. */
  dir: string;
}

/** Lock file held while the folder's development set is checked and completed. */
const CERTS_LOCK = ".tessera-certs.lock";
const DEFAULT_SERVER_NAMES = ["localhost", "127.0.0.1", "::1"];

/**
 * If `dir` lacks ca.crt/server.crt/server.key, create a development CA (ca.crt + ca.key, ca.key mode
 * 0600, `dir` created 0700 if absent) and a server certificate signed by it (server.crt + server.key,
 * server.key mode 0600) for DNS `localhost`, IP `127.0.0.1` and IP `::1`, with extKeyUsage serverAuth.
 *
 * Existing files are never overwritten:
 * - all of ca.crt, server.crt and server.key present: nothing is written (`created: false`);
 * - ca.crt + ca.key present but no server files: only the server certificate is issued from that CA;
 * - any other partial state (one server file without the other, server files without ca.crt, ca.key
 *   without ca.crt, ca.crt without ca.key while a server certificate is needed) is an Error that names
 *   the files, because completing it would mean replacing a file or minting something that cannot match.
 *
 * The CA key stays next to the CA so `createClientCertificate` can mint client certificates later.
 * Keys are ECDSA P-256 (PKCS#8 PEM), signatures SHA-256, serials 16 random bytes.
 *
 * @param dir Certificate folder, e.g. `./certs`.
 * @param opts.hosts Extra DNS names / IP addresses for the server certificate, added to the defaults.
 * @param opts.validityDays Server certificate lifetime in days (default 825; the CA lives 10 years).
 * @returns Whether anything was created, and the folder.
 */
export async function ensureDevCertificates(
  dir: string,
  opts: { hosts?: string[]; validityDays?: number } = {},
): Promise<EnsureCertsResult> {
  // A complete set needs no lock (nor a writable folder: certificates mounted read-only).
  const complete = await Promise.all([CA_CERT, SERVER_CERT, SERVER_KEY].map((f) => exists(join(dir, f))));
  if (complete.every(Boolean)) {
    // A set with its CA key is a development set, which this start could have made: one
    // another user planted, or can rewrite, is their CA that mTLS trusts for clients, and
    // their server key. (Without ca.key it is a production set, mounted as its owner chose.)
    if (await exists(join(dir, CA_KEY))) assertDevSetOwned(dir, [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]);
    return { created: false, dir };
  }
  // A folder another user owns is theirs to fill: a CA of their own, planted beside the
  // files this start creates, would sign the server's certificate and be trusted for clients'.
  assertOwned(dir, "certificate folder", true);
  // Instances started together on one (shared) folder: one creates, the others then find
  // the set complete, never two CAs nor a CA key without its certificate.
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return withFileLock(join(dir, CERTS_LOCK), () => ensureDevCertificatesLocked(dir, opts));
}

/** Refuse a certificate folder, or one of its `files`, of another user's (a folder of root's is fine). */
function assertDevSetOwned(dir: string, files: string[]): void {
  assertOwned(dir, "certificate folder", true);
  for (const f of files) assertOwned(join(dir, f), "development certificate file", true);
}

async function ensureDevCertificatesLocked(
  dir: string,
  opts: { hosts?: string[]; validityDays?: number },
): Promise<EnsureCertsResult> {
  const caCertPath = join(dir, CA_CERT);
  const caKeyPath = join(dir, CA_KEY);
  const serverCertPath = join(dir, SERVER_CERT);
  const serverKeyPath = join(dir, SERVER_KEY);
  const [hasCaCert, hasCaKey, hasServerCert, hasServerKey] = await Promise.all(
    [caCertPath, caKeyPath, serverCertPath, serverKeyPath].map(exists),
  );

  if (hasServerCert && hasServerKey) {
    if (hasCaCert) return { created: false, dir };
    throw new Error(
      `${caCertPath} is missing but ${SERVER_CERT} and ${SERVER_KEY} exist; a new CA could not have signed them. ` +
        `Restore ${CA_CERT}, or remove the server files to generate a fresh development set.`,
    );
  }
  if (hasServerCert !== hasServerKey) {
    const [present, missing] = hasServerCert
      ? [serverCertPath, serverKeyPath]
      : [serverKeyPath, serverCertPath];
    throw new Error(
      `${present} exists without ${missing}; refusing to overwrite it. Restore ${missing} or remove ${present}.`,
    );
  }
  if (!hasCaCert && hasCaKey) {
    throw new Error(
      `${caKeyPath} exists without ${caCertPath}; refusing to overwrite the CA key. Restore ${CA_CERT} or remove ${CA_KEY}.`,
    );
  }

  // The CA that signs the new server certificate, and that mTLS then trusts, must be one of ours.
  for (const path of [caCertPath, caKeyPath]) assertOwned(path, "development CA file");

  // Validate inputs before touching the disk so a bad option leaves no half-made folder behind.
  const validityDays = checkValidityDays(opts.validityDays ?? DEFAULT_LEAF_DAYS, "server certificate");
  const names: SanEntry[] = [];
  for (const host of [...DEFAULT_SERVER_NAMES, ...(opts.hosts ?? [])]) {
    const san = serverSan(host);
    if (!names.some((n) => n.type === san.type && n.value === san.value)) names.push(san);
  }

  // mode applies only to directories mkdir creates; an existing folder keeps its permissions.
  await mkdir(dir, { recursive: true, mode: 0o700 });
  if (!hasCaCert) {
    const ca = await generateCa("Tessera Development CA", DEFAULT_CA_DAYS);
    // Key first: if we crash in between, a lone ca.key is reported above instead of an unusable ca.crt.
    await writeNewFile(caKeyPath, ca.keyPem, 0o600);
    await writeNewFile(caCertPath, ca.certPem, 0o644);
  }
  const ca = await loadCa(dir);
  const server = await issueLeaf(ca, { commonName: "localhost", usage: "server", names, validityDays });
  await writeNewFile(serverKeyPath, server.keyPem, 0o600);
  await writeNewFile(serverCertPath, server.certPem, 0o644);
  return { created: true, dir };
}

/**
 * Mint a client certificate signed by the CA in `caDir` (needs ca.crt + ca.key there; otherwise an Error
 * naming the missing path). Writes `client.crt`, `client.key` (mode 0600) and a copy of `ca.crt` into
 * `outDir` (created 0700 if needed): the layout an SDK cert folder expects. Files already in `outDir` are
 * replaced atomically, so re-running rotates the client's credentials.
 *
 * The certificate has subject CN = `name`, extKeyUsage clientAuth, and, when given, a subjectAltName URI
 * (e.g. `spiffe://tenant/app`). Its lifetime never exceeds the CA's.
 *
 * @param caDir Folder holding the issuing CA (ca.crt + ca.key).
 * @param name Subject common name, 1-64 characters.
 * @param outDir Destination cert folder.
 * @param opts.sanUri Absolute ASCII URI to put in subjectAltName.
 * @param opts.validityDays Lifetime in days (default 825).
 * @returns Paths of the three written files and the certificate's SHA-256 fingerprint (lowercase hex, no colons).
 */
export async function createClientCertificate(
  caDir: string,
  name: string,
  outDir: string,
  opts: { sanUri?: string; validityDays?: number } = {},
): Promise<{ certPath: string; keyPath: string; caPath: string; sha256Fingerprint: string }> {
  checkCommonName(name, "client name");
  if (opts.sanUri !== undefined) checkSanUri(opts.sanUri);
  const validityDays = checkValidityDays(opts.validityDays ?? DEFAULT_LEAF_DAYS, "client certificate");
  const ca = await loadCa(caDir);
  const leaf = await issueLeaf(ca, {
    commonName: name,
    usage: "client",
    names: opts.sanUri !== undefined ? [{ type: "url", value: opts.sanUri }] : [],
    validityDays,
  });
  await mkdir(outDir, { recursive: true, mode: 0o700 });
  const certPath = join(outDir, CLIENT_CERT);
  const keyPath = join(outDir, CLIENT_KEY);
  const caPath = join(outDir, CA_CERT);
  // Key before certificate, so a reader never finds a new certificate paired with the old key.
  await replaceFile(keyPath, leaf.keyPem, 0o600);
  await replaceFile(certPath, leaf.certPem, 0o644);
  await replaceFile(caPath, ca.certPem, 0o644);
  return { certPath, keyPath, caPath, sha256Fingerprint: certificateFingerprint(leaf.certPem) };
}

/**
 * Create a standalone CA in `dir` (ca.crt, and ca.key with mode 0600; `dir` created 0700 if absent) — used by
 * tests to make a foreign CA. Same profile as the development CA: ECDSA P-256, basicConstraints CA (critical),
 * keyUsage keyCertSign | cRLSign. Refuses to overwrite an existing ca.crt or ca.key.
 *
 * @param dir Destination folder.
 * @param opts.commonName Subject CN (default "Tessera Test CA").
 * @param opts.validityDays Lifetime in days (default 3650).
 */
export async function createCertificateAuthority(
  dir: string,
  opts: { commonName?: string; validityDays?: number } = {},
): Promise<void> {
  const commonName = opts.commonName ?? "Tessera Test CA";
  checkCommonName(commonName, "CA common name");
  const validityDays = checkValidityDays(opts.validityDays ?? DEFAULT_CA_DAYS, "CA");
  const certPath = join(dir, CA_CERT);
  const keyPath = join(dir, CA_KEY);
  for (const path of [certPath, keyPath]) {
    if (await exists(path)) throw new Error(`refusing to overwrite existing file ${path}`);
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const ca = await generateCa(commonName, validityDays);
  await writeNewFile(keyPath, ca.keyPem, 0o600);
  await writeNewFile(certPath, ca.certPem, 0o644);
}
