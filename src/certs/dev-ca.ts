import { X509Certificate as NodeX509, randomBytes, webcrypto } from "node:crypto";
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";

// @peculiar/x509 needs a WebCrypto implementation; Node's is complete for ECDSA P-256.
x509.cryptoProvider.set(webcrypto as never);

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;

const ALG = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
const DAY = 24 * 3600 * 1000;

/** What {@link ensureDevCertificates} did. */
export interface EnsureCertsResult {
  created: boolean;
  dir: string;
}

function serial(): string {
  const bytes = randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f; // positive INTEGER
  return bytes.toString("hex");
}

async function keyPair(): Promise<CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(ALG, true, ["sign", "verify"])) as unknown as CryptoKeyPair;
}

async function privateKeyPem(key: CryptoKey): Promise<string> {
  const pkcs8 = await webcrypto.subtle.exportKey("pkcs8", key);
  return x509.PemConverter.encode(pkcs8, "PRIVATE KEY");
}

async function writeSecret(path: string, content: string): Promise<void> {
  await writeFile(path, content, { mode: 0o600 });
  await chmod(path, 0o600); // the mode option is ignored when the file already existed
}

interface LoadedCa {
  cert: x509.X509Certificate;
  key: CryptoKey;
  pem: string;
}

async function loadCa(caDir: string): Promise<LoadedCa> {
  const certPath = join(caDir, "ca.crt");
  const keyPath = join(caDir, "ca.key");
  for (const p of [certPath, keyPath]) {
    if (!existsSync(p)) throw new Error(`CA file missing: ${p} (run "tessera certs" to create a development CA)`);
  }
  const pem = await readFile(certPath, "utf8");
  const keyPem = await readFile(keyPath, "utf8");
  const key = (await webcrypto.subtle.importKey("pkcs8", x509.PemConverter.decodeFirst(keyPem), ALG, true, ["sign"])) as unknown as CryptoKey;
  return { cert: new x509.X509Certificate(pem), key, pem };
}

async function createCa(commonName: string, validityDays: number): Promise<{ certPem: string; keyPem: string }> {
  const keys = await keyPair();
  const now = new Date();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=${commonName}`,
    notBefore: new Date(now.getTime() - 60_000),
    notAfter: new Date(now.getTime() + validityDays * DAY),
    signingAlgorithm: ALG,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: cert.toString("pem"), keyPem: await privateKeyPem(keys.privateKey) };
}

async function issueLeaf(
  ca: LoadedCa,
  options: { commonName: string; usage: "server" | "client"; names: { type: "dns" | "ip" | "url"; value: string }[]; validityDays: number },
): Promise<{ certPem: string; keyPem: string }> {
  const keys = await keyPair();
  const now = new Date();
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
    new x509.ExtendedKeyUsageExtension([options.usage === "server" ? x509.ExtendedKeyUsage.serverAuth : x509.ExtendedKeyUsage.clientAuth]),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    await x509.AuthorityKeyIdentifierExtension.create(ca.cert),
  ];
  if (options.names.length > 0) extensions.push(new x509.SubjectAlternativeNameExtension(options.names));
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: `CN=${options.commonName}`,
    issuer: ca.cert.subject,
    notBefore: new Date(now.getTime() - 60_000),
    notAfter: new Date(now.getTime() + options.validityDays * DAY),
    signingAlgorithm: ALG,
    publicKey: keys.publicKey,
    signingKey: ca.key,
    extensions,
  });
  return { certPem: cert.toString("pem"), keyPem: await privateKeyPem(keys.privateKey) };
}

/**
 * If `dir` lacks ca.crt/server.crt/server.key, create a development CA (ca.crt + ca.key,
 * 0600) and a server certificate signed by it for localhost, 127.0.0.1 and ::1.
 * Existing files are never overwritten. The CA key stays beside the CA so that
 * `tessera certs client` can mint client certificates; production brings its own CA.
 */
export async function ensureDevCertificates(dir: string, opts: { hosts?: string[]; validityDays?: number } = {}): Promise<EnsureCertsResult> {
  const paths = ["ca.crt", "server.crt", "server.key"].map((f) => join(dir, f));
  if (paths.every((p) => existsSync(p))) return { created: false, dir };
  if (paths.some((p) => existsSync(p))) {
    throw new Error(`${dir} holds only part of ca.crt, server.crt, server.key; refusing to overwrite — complete or remove them`);
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  if (!existsSync(join(dir, "ca.key"))) {
    const ca = await createCa("Tessera Development CA", 3650);
    await writeFile(join(dir, "ca.crt"), ca.certPem);
    await writeSecret(join(dir, "ca.key"), ca.keyPem);
  }
  const ca = await loadCa(dir);
  const hosts = opts.hosts ?? ["localhost", "127.0.0.1", "::1"];
  const names = hosts.map((h) => ({ type: (/^[\d.]+$|:/.test(h) ? "ip" : "dns") as "ip" | "dns", value: h }));
  const server = await issueLeaf(ca, { commonName: hosts[0] ?? "localhost", usage: "server", names, validityDays: opts.validityDays ?? 825 });
  await writeFile(join(dir, "server.crt"), server.certPem);
  await writeSecret(join(dir, "server.key"), server.keyPem);
  return { created: true, dir };
}

/**
 * Mint a client certificate signed by the CA in `caDir` (ca.crt + ca.key). Writes
 * client.crt, client.key (0600) and a copy of ca.crt into `outDir`: the cert-folder
 * layout the SDK reads.
 */
export async function createClientCertificate(
  caDir: string,
  name: string,
  outDir: string,
  opts: { sanUri?: string; validityDays?: number } = {},
): Promise<{ certPath: string; keyPath: string; caPath: string; sha256Fingerprint: string }> {
  if (!/^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/.test(name)) throw new Error(`client name "${name}" must be 1-64 characters of letters, digits and . _ @ -`);
  if (opts.sanUri !== undefined && !/^[a-z][a-z0-9+.-]*:\/\/\S+$/.test(opts.sanUri)) throw new Error(`--san-uri "${opts.sanUri}" is not an absolute URI`);
  const ca = await loadCa(caDir);
  const leaf = await issueLeaf(ca, {
    commonName: name,
    usage: "client",
    names: opts.sanUri ? [{ type: "url", value: opts.sanUri }] : [],
    validityDays: opts.validityDays ?? 825,
  });
  await mkdir(outDir, { recursive: true, mode: 0o700 });
  const certPath = join(outDir, "client.crt");
  const keyPath = join(outDir, "client.key");
  const caPath = join(outDir, "ca.crt");
  await writeFile(certPath, leaf.certPem);
  await writeSecret(keyPath, leaf.keyPem);
  await writeFile(caPath, ca.pem);
  return { certPath, keyPath, caPath, sha256Fingerprint: certificateFingerprint(leaf.certPem) };
}

/** Create a standalone CA (ca.crt, ca.key) in `dir`, e.g. a foreign CA for tests. */
export async function createCertificateAuthority(dir: string, opts: { commonName?: string; validityDays?: number } = {}): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const ca = await createCa(opts.commonName ?? "Tessera Test CA", opts.validityDays ?? 3650);
  await writeFile(join(dir, "ca.crt"), ca.certPem);
  await writeSecret(join(dir, "ca.key"), ca.keyPem);
}

/** Write `ca.crl` in caDir, signed by its CA, revoking the given certificates. */
export async function writeCrl(caDir: string, revokedCertPems: string[]): Promise<string> {
  const ca = await loadCa(caDir);
  const now = new Date();
  const crl = await x509.X509CrlGenerator.create({
    issuer: ca.cert.subject,
    thisUpdate: new Date(now.getTime() - 60_000),
    nextUpdate: new Date(now.getTime() + 7 * DAY),
    signingAlgorithm: ALG,
    signingKey: ca.key,
    entries: revokedCertPems.map((pem) => ({ serialNumber: new x509.X509Certificate(pem).serialNumber, revocationDate: now })),
    extensions: [await x509.AuthorityKeyIdentifierExtension.create(ca.cert)],
  });
  const path = join(caDir, "ca.crl");
  await writeFile(path, crl.toString("pem"));
  return path;
}

/** SHA-256 fingerprint (lowercase hex, no colons) of a PEM certificate. */
export function certificateFingerprint(pem: string): string {
  return new NodeX509(pem).fingerprint256.replace(/:/g, "").toLowerCase();
}
