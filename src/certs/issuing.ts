// Loading a CA and issuing X.509 certificates from it (keys, serials, names, lifetimes): the
// profile every development, client and foreign-test certificate shares.

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
import { readFile } from "node:fs/promises";
import { isIP } from "node:net";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import { exists } from "./files.js";

// Node's WebCrypto covers everything used here (ECDSA P-256/384/521, RSASSA-PKCS1-v1_5, SHA-2), so no
// polyfill provider is needed. The cast bridges Node's webcrypto typings and the DOM-flavoured ones x509 expects.
x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

type CryptoKey = webcrypto.CryptoKey;

export const CA_CERT = "ca.crt";
export const CA_KEY = "ca.key";
export const SERVER_CERT = "server.crt";
export const SERVER_KEY = "server.key";
export const CLIENT_CERT = "client.crt";
export const CLIENT_KEY = "client.key";
export const CRL_FILE = "ca.crl";

export const DAY_MS = 24 * 60 * 60 * 1000;
export const DEFAULT_CA_DAYS = 3650;
// 825 days is the longest leaf lifetime Apple platforms (and several TLS clients following them) accept.
export const DEFAULT_LEAF_DAYS = 825;
// A CRL past its nextUpdate makes OpenSSL reject every client ("CRL has expired"), so a development CRL
// must not lapse quietly after a week; a year keeps a dev server working while still expiring eventually.
export const DEFAULT_CRL_DAYS = 365;
// Backdating notBefore/thisUpdate absorbs small clock differences between the minting host and verifiers.
export const BACKDATE_MS = 5 * 60 * 1000;

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

export type SanEntry = { type: "dns" | "ip" | "url"; value: string };

export function checkValidityDays(days: number, what: string): number {
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
export async function loadCa(caDir: string): Promise<LoadedCa> {
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
export async function authorityKeyId(ca: LoadedCa): Promise<x509.AuthorityKeyIdentifierExtension> {
  const ski = ca.cert.getExtension(x509.SubjectKeyIdentifierExtension);
  if (ski) return new x509.AuthorityKeyIdentifierExtension(ski.keyId);
  return x509.AuthorityKeyIdentifierExtension.create(ca.cert.publicKey);
}

export async function generateCa(commonName: string, validityDays: number): Promise<Issued> {
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

export async function issueLeaf(
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
export function serverSan(host: string): SanEntry {
  const value = host.trim().toLowerCase();
  if (isIP(value) !== 0) return { type: "ip", value };
  // DNS names per RFC 1123 labels, with an optional leading wildcard label.
  const label = "(?!-)[a-z0-9-]{1,63}(?<!-)";
  if (value.length <= 253 && new RegExp(`^(\\*\\.)?${label}(\\.${label})*$`).test(value))
    return { type: "dns", value };
  throw new Error(`host "${host}" is neither an IP address nor a valid DNS name`);
}

export function checkCommonName(name: string, what: string): void {
  // RFC 5280 caps commonName at 64 characters; control characters have no business in a subject.
  // biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
  if (name.length === 0 || name.length > 64 || /[\u0000-\u001f\u007f]/.test(name)) {
    throw new Error(
      `${what} must be 1-64 characters without control characters, got ${JSON.stringify(name)}`,
    );
  }
}

export function checkSanUri(uri: string): void {
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
 * SHA-256 fingerprint of a PEM certificate as lowercase hex without colons (the same value as Node's
 * `X509Certificate.fingerprint256` with colons removed). Only the first certificate of a bundle is used.
 *
 * @param pem PEM-encoded certificate.
 */
export function certificateFingerprint(pem: string): string {
  return new NodeX509Certificate(pem).fingerprint256.replace(/:/g, "").toLowerCase();
}
