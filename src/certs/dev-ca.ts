// @peculiar/x509 resolves its algorithms through tsyringe, which throws at import time unless a
// Reflect metadata polyfill is loaded first; this side-effect import must stay above the x509 import.
import "reflect-metadata";
import {
  createPrivateKey,
  createPublicKey,
  KeyObject,
  X509Certificate as NodeX509Certificate,
  randomBytes,
  webcrypto,
} from "node:crypto";
import { mkdir, readFile, rename, stat, unlink, writeFile } from "node:fs/promises";
import { isIP } from "node:net";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import { withFileLock } from "../storage/startup-lock.js";

// Node's WebCrypto covers everything used here (ECDSA P-256/384/521, RSASSA-PKCS1-v1_5, SHA-2), so no
// polyfill provider is needed. The cast bridges Node's webcrypto typings and the DOM-flavoured ones x509 expects.
x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

type CryptoKey = webcrypto.CryptoKey;

/** Result of {@link ensureDevCertificates}. */
export interface EnsureCertsResult {
  /** `true` when at least one file was written, `false` when the folder was already complete. */
  created: boolean;
  /** The folder that was checked, as passed in. */
  dir: string;
}

const CA_CERT = "ca.crt";
const CA_KEY = "ca.key";
const SERVER_CERT = "server.crt";
const SERVER_KEY = "server.key";
const CLIENT_CERT = "client.crt";
const CLIENT_KEY = "client.key";
const CRL_FILE = "ca.crl";
/** Lock file held while the folder's development set is checked and completed. */
const CERTS_LOCK = ".tessera-certs.lock";

const DAY_MS = 24 * 60 * 60 * 1000;
const DEFAULT_CA_DAYS = 3650;
// 825 days is the longest leaf lifetime Apple platforms (and several TLS clients following them) accept.
const DEFAULT_LEAF_DAYS = 825;
// A CRL past its nextUpdate makes OpenSSL reject every client ("CRL has expired"), so a development CRL
// must not lapse quietly after a week; a year keeps a dev server working while still expiring eventually.
const DEFAULT_CRL_DAYS = 365;
// Backdating notBefore/thisUpdate absorbs small clock differences between the minting host and verifiers.
const BACKDATE_MS = 5 * 60 * 1000;
const DEFAULT_SERVER_NAMES = ["localhost", "127.0.0.1", "::1"];

const EC_KEY_ALGORITHM: webcrypto.EcKeyGenParams = { name: "ECDSA", namedCurve: "P-256" };
const EC_SIGNING_ALGORITHM: webcrypto.EcdsaParams = { name: "ECDSA", hash: "SHA-256" };

/** A CA loaded from disk, ready to sign. */
interface LoadedCa {
  certPem: string;
  cert: x509.X509Certificate;
  nodeCert: NodeX509Certificate;
  signingKey: CryptoKey;
  signingAlgorithm: webcrypto.AlgorithmIdentifier | webcrypto.EcdsaParams | webcrypto.RsaHashedImportParams;
}

/** A freshly generated certificate and its private key, both PEM. */
interface Issued {
  certPem: string;
  keyPem: string;
}

type SanEntry = { type: "dns" | "ip" | "url"; value: string };

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  }
}

/**
 * Write a file that must not exist yet. The `wx` flag makes the no-overwrite promise hold even if
 * another process creates the file between our existence check and this write.
 */
async function writeNewFile(path: string, content: string, mode: number): Promise<void> {
  try {
    await writeFile(path, content, { flag: "wx", mode });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") {
      throw new Error(`refusing to overwrite existing file ${path}`);
    }
    throw err;
  }
}

/**
 * Replace a file atomically: write a sibling temp file with the final mode, then rename over the target.
 * Readers (a server reloading a CRL, an SDK reading its cert folder) never see a half-written file, and a
 * key replacing an older world-readable file still ends up 0600 because the mode comes from the new inode.
 */
async function replaceFile(path: string, content: string, mode: number): Promise<void> {
  const tmp = `${path}.${randomBytes(6).toString("hex")}.tmp`;
  await writeFile(tmp, content, { flag: "wx", mode });
  try {
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
}

function checkValidityDays(days: number, what: string): number {
  if (!Number.isFinite(days) || days <= 0)
    throw new Error(`${what} validityDays must be a positive number, got ${days}`);
  return days;
}

/** 16 random bytes as hex; the top bits are fixed to 01 so the DER INTEGER is positive and exactly 16 bytes. */
function randomSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x3f) | 0x40;
  return bytes.toString("hex");
}

async function generateEcKeys(): Promise<webcrypto.CryptoKeyPair> {
  return webcrypto.subtle.generateKey(EC_KEY_ALGORITHM, true, ["sign", "verify"]);
}

/** PKCS#8 PEM via Node's encoder, so the output is byte-for-byte what OpenSSL tooling writes. */
function privateKeyPem(key: CryptoKey): string {
  return KeyObject.from(key).export({ format: "pem", type: "pkcs8" }) as string;
}

/** Map a CA private key to the WebCrypto parameters needed to import it and to sign with it. */
function signingParamsFor(
  key: KeyObject,
  path: string,
): {
  importAlgorithm: webcrypto.EcKeyImportParams | webcrypto.RsaHashedImportParams;
  signingAlgorithm: webcrypto.EcdsaParams | webcrypto.AlgorithmIdentifier;
} {
  const details = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === "ec") {
    // Match the hash strength to the curve, as CAs conventionally do (P-256/SHA-256, P-384/SHA-384, ...).
    const curves: Record<string, { namedCurve: string; hash: string }> = {
      prime256v1: { namedCurve: "P-256", hash: "SHA-256" },
      secp384r1: { namedCurve: "P-384", hash: "SHA-384" },
      secp521r1: { namedCurve: "P-521", hash: "SHA-512" },
    };
    const curve = curves[details.namedCurve ?? ""];
    if (curve) {
      return {
        importAlgorithm: { name: "ECDSA", namedCurve: curve.namedCurve },
        signingAlgorithm: { name: "ECDSA", hash: curve.hash },
      };
    }
  }
  if (key.asymmetricKeyType === "rsa") {
    return {
      importAlgorithm: { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" },
      signingAlgorithm: { name: "RSASSA-PKCS1-v1_5" },
    };
  }
  const kind =
    key.asymmetricKeyType === "ec" ? `EC ${details.namedCurve ?? "unknown curve"}` : key.asymmetricKeyType;
  throw new Error(`CA key ${path} is a ${kind} key; only EC P-256/P-384/P-521 and RSA CA keys are supported`);
}

/** Load ca.crt + ca.key from `caDir`, checking that both exist, parse, and belong together. */
async function loadCa(caDir: string): Promise<LoadedCa> {
  const certPath = join(caDir, CA_CERT);
  const keyPath = join(caDir, CA_KEY);
  for (const path of [certPath, keyPath]) {
    if (!(await exists(path))) {
      throw new Error(
        `CA file not found: ${path} (both ${CA_CERT} and ${CA_KEY} are needed to sign certificates)`,
      );
    }
  }
  const certPem = await readFile(certPath, "utf8");
  let nodeCert: NodeX509Certificate;
  let keyObject: KeyObject;
  try {
    nodeCert = new NodeX509Certificate(certPem);
  } catch (err) {
    throw new Error(`cannot parse CA certificate ${certPath}: ${(err as Error).message}`);
  }
  try {
    // createPrivateKey also reads SEC1 ("EC PRIVATE KEY") and PKCS#1 PEM, so an operator's CA key made by
    // openssl works, not only the PKCS#8 files this module writes.
    keyObject = createPrivateKey(await readFile(keyPath));
  } catch (err) {
    throw new Error(`cannot read CA private key ${keyPath}: ${(err as Error).message}`);
  }
  // A mismatched pair would sign certificates that silently fail verification at every peer; fail here instead.
  if (!createPublicKey(keyObject).equals(nodeCert.publicKey)) {
    throw new Error(`CA private key ${keyPath} does not match the public key in ${certPath}`);
  }
  if (!nodeCert.ca) throw new Error(`${certPath} is not a CA certificate (basicConstraints CA:TRUE missing)`);
  const params = signingParamsFor(keyObject, keyPath);
  const signingKey = await webcrypto.subtle.importKey(
    "pkcs8",
    keyObject.export({ format: "der", type: "pkcs8" }),
    params.importAlgorithm,
    false,
    ["sign"],
  );
  return {
    certPem,
    cert: new x509.X509Certificate(certPem),
    nodeCert,
    signingKey,
    signingAlgorithm: params.signingAlgorithm,
  };
}

/** Authority key identifier for certificates/CRLs issued by `ca`, reusing its SKI so the two always match. */
async function authorityKeyId(ca: LoadedCa): Promise<x509.AuthorityKeyIdentifierExtension> {
  const ski = ca.cert.getExtension(x509.SubjectKeyIdentifierExtension);
  if (ski) return new x509.AuthorityKeyIdentifierExtension(ski.keyId);
  return x509.AuthorityKeyIdentifierExtension.create(ca.cert.publicKey);
}

async function generateCa(commonName: string, validityDays: number): Promise<Issued> {
  const keys = await generateEcKeys();
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    // The JSON form bypasses RFC 4514 string parsing, so names containing ',' or '=' are taken literally.
    name: [{ CN: [commonName] }],
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + validityDays * DAY_MS),
    signingAlgorithm: EC_SIGNING_ALGORITHM,
    keys: keys as unknown as x509.X509CertificateCreateSelfSignedParams["keys"],
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey as never),
    ],
  });
  return { certPem: cert.toString("pem"), keyPem: privateKeyPem(keys.privateKey) };
}

async function issueLeaf(
  ca: LoadedCa,
  leaf: { commonName: string; usage: "server" | "client"; names: SanEntry[]; validityDays: number },
): Promise<Issued> {
  const keys = await generateEcKeys();
  const now = Date.now();
  // A leaf outliving its CA would be unverifiable after the CA expires anyway; clamp so dates tell the truth.
  const notAfter = new Date(Math.min(now + leaf.validityDays * DAY_MS, ca.cert.notAfter.getTime()));
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    // digitalSignature is what an ECDSA key does in a TLS handshake (both TLS 1.2 ECDHE_ECDSA and TLS 1.3).
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
    new x509.ExtendedKeyUsageExtension([
      leaf.usage === "server" ? x509.ExtendedKeyUsage.serverAuth : x509.ExtendedKeyUsage.clientAuth,
    ]),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey as never),
    await authorityKeyId(ca),
  ];
  if (leaf.names.length > 0) extensions.push(new x509.SubjectAlternativeNameExtension(leaf.names));
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: [{ CN: [leaf.commonName] }],
    // Passing the parsed Name (not its string form) copies the CA subject's DER exactly, so issuer/subject
    // matching never depends on how a string would be re-encoded.
    issuer: ca.cert.subjectName,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter,
    signingAlgorithm: ca.signingAlgorithm as webcrypto.EcdsaParams,
    publicKey: keys.publicKey as never,
    signingKey: ca.signingKey as never,
    extensions,
  });
  return { certPem: cert.toString("pem"), keyPem: privateKeyPem(keys.privateKey) };
}

/** Classify a host name for the server certificate's subjectAltName, rejecting anything that is neither. */
function serverSan(host: string): SanEntry {
  const value = host.trim().toLowerCase();
  if (isIP(value) !== 0) return { type: "ip", value };
  // DNS names per RFC 1123 labels, with an optional leading wildcard label.
  const label = "(?!-)[a-z0-9-]{1,63}(?<!-)";
  if (value.length <= 253 && new RegExp(`^(\\*\\.)?${label}(\\.${label})*$`).test(value))
    return { type: "dns", value };
  throw new Error(`host "${host}" is neither an IP address nor a valid DNS name`);
}

function checkCommonName(name: string, what: string): void {
  // RFC 5280 caps commonName at 64 characters; control characters have no business in a subject.
  // biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
  if (name.length === 0 || name.length > 64 || /[\u0000-\u001f\u007f]/.test(name)) {
    throw new Error(
      `${what} must be 1-64 characters without control characters, got ${JSON.stringify(name)}`,
    );
  }
}

function checkSanUri(uri: string): void {
  // subjectAltName URIs are IA5String: printable ASCII only. They must also be absolute (scheme:...).
  let parsed: URL | undefined;
  try {
    parsed = new URL(uri);
  } catch {
    parsed = undefined;
  }
  if (!/^[\x21-\x7e]+$/.test(uri) || parsed === undefined || !/^[a-z][a-z0-9+.-]*:/i.test(uri)) {
    throw new Error(
      `SAN URI ${JSON.stringify(uri)} is not an absolute ASCII URI (for example spiffe://tenant/app)`,
    );
  }
}

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
  if (complete.every(Boolean)) return { created: false, dir };
  // Instances started together on one (shared) folder: one creates, the others then find
  // the set complete, never two CAs nor a CA key without its certificate.
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return withFileLock(join(dir, CERTS_LOCK), () => ensureDevCertificatesLocked(dir, opts));
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

/** DER encoding of a non-negative INTEGER (minimal length, leading 0x00 when the high bit is set). */
function derInteger(value: bigint): Uint8Array {
  let hex = value.toString(16);
  if (hex.length % 2 === 1) hex = `0${hex}`;
  let body = Buffer.from(hex, "hex");
  if (body[0]! & 0x80) body = Buffer.concat([Buffer.from([0]), body]);
  return Uint8Array.from([0x02, body.length, ...body]);
}

/**
 * Revoke client certificates: write (or atomically overwrite) `ca.crl` in `caDir`, a PEM X.509 v2 CRL signed
 * by the CA there, listing the serial numbers of `revokedCertPems`. The list replaces any previous CRL, so
 * pass every certificate that should stay revoked; an empty list yields a valid CRL revoking nothing.
 *
 * Each certificate must have been issued by this CA (an Error otherwise), since a serial number only means
 * something relative to its issuer. The CRL carries an authority key identifier and a CRL number (the
 * current time in milliseconds, so successive CRLs increase), and is valid for a year unless told otherwise:
 * OpenSSL refuses every client once a configured CRL passes its nextUpdate.
 *
 * @param caDir Folder holding the issuing CA (ca.crt + ca.key).
 * @param revokedCertPems PEM certificates to revoke.
 * @param opts.validityDays Days until the CRL's nextUpdate (default 365).
 * @returns Path of the written CRL.
 */
export async function writeCrl(
  caDir: string,
  revokedCertPems: string[],
  opts: { validityDays?: number } = {},
): Promise<string> {
  const validityDays = checkValidityDays(opts.validityDays ?? DEFAULT_CRL_DAYS, "CRL");
  const ca = await loadCa(caDir);
  const now = new Date();
  const serials = new Set<string>();
  for (const [i, pem] of revokedCertPems.entries()) {
    let cert: NodeX509Certificate;
    try {
      cert = new NodeX509Certificate(pem);
    } catch (err) {
      throw new Error(`revokedCertPems[${i}] is not a PEM certificate: ${(err as Error).message}`);
    }
    if (!cert.checkIssued(ca.nodeCert) || !cert.verify(ca.nodeCert.publicKey)) {
      throw new Error(
        `revokedCertPems[${i}] (${cert.subject.replace(/\n/g, ", ")}) was not issued by the CA in ${caDir}`,
      );
    }
    // x509's serial is the hex of the DER content octets: even-length and directly reusable in a CRL entry.
    serials.add(new x509.X509Certificate(pem).serialNumber.toLowerCase());
  }
  const crl = await x509.X509CrlGenerator.create({
    issuer: ca.cert.subjectName,
    thisUpdate: new Date(now.getTime() - BACKDATE_MS),
    nextUpdate: new Date(now.getTime() + validityDays * DAY_MS),
    signingAlgorithm: ca.signingAlgorithm as webcrypto.EcdsaParams,
    signingKey: ca.signingKey as never,
    entries: [...serials].map((serialNumber) => ({ serialNumber, revocationDate: now })),
    extensions: [
      await authorityKeyId(ca),
      // cRLNumber (2.5.29.20) is mandatory in conforming CRLs; a timestamp is monotonic without keeping state.
      new x509.Extension("2.5.29.20", false, derInteger(BigInt(now.getTime()))),
    ],
  });
  const path = join(caDir, CRL_FILE);
  // x509 labels CRL PEM "BEGIN CRL", which OpenSSL (and so Node's tls `crl` option) does not read; RFC 7468
  // and OpenSSL use "X509 CRL".
  await replaceFile(path, x509.PemConverter.encode(crl.rawData, "X509 CRL"), 0o644);
  return path;
}

/**
 * SHA-256 fingerprint of a PEM certificate as lowercase hex without colons (the same value as Node's
 * `X509Certificate.fingerprint256` with colons removed). Only the first certificate of a bundle is used.
 *
 * @param pem PEM-encoded certificate.
 */
export function certificateFingerprint(pem: string): string {
  return new NodeX509Certificate(pem).fingerprint256.replace(/:/g, "").toLowerCase();
}
