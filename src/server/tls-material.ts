import { createPrivateKey, X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createSecureContext } from "node:tls";
import { revokedSerials } from "../certs/crl.js";
import { ensureDevCertificates } from "../certs/dev-ca.js";
import { type TrustAnchors, trustAnchors } from "../certs/trust-anchors.js";
import type { Config } from "../config.js";
import { openToOthers } from "../private-files.js";

/** TLS files read from the cert folder. */
export interface TlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  crl?: Buffer;
  /** ca.crt's certificates, parsed: what a client certificate must still chain to on every request. */
  anchors: TrustAnchors;
  /** The serials the CRL revokes (normalised, see certs/serial.ts); empty without one. */
  revoked: ReadonlySet<string>;
  /** server.crt's (first certificate's) notAfter, in unix seconds; undefined when it does not parse. */
  notAfter: number | undefined;
}

/**
 * Certificate reloads that failed since the start, and the served server certificate's notAfter (unix
 * seconds, 0 before one is served): process-wide, read by the metrics when scraped.
 */
export const tlsStatus = { reloadFailures: 0, certificateNotAfter: 0 };

/**
 * What {@link loadTlsMaterial} does with a private key (server.key, ca.key) any user of the
 * machine can read or write: `refuse` (at start) throws; a function (on a reload) is told
 * and the files are loaded, since the running server holds that key already and refusing
 * would only keep the old certificate until it expires.
 */
export type OpenKeyPolicy = "refuse" | ((problem: string) => void);

/**
 * Read ca.crt, server.crt, server.key (and ca.crl when present) from the cert folder,
 * generating a development CA and server certificate first when allowed and absent.
 */
export async function loadTlsMaterial(
  config: Config["server"],
  openKey: OpenKeyPolicy = "refuse",
): Promise<TlsMaterial> {
  const dir = config.certDir;
  const need = ["ca.crt", "server.crt", "server.key"].map((f) => join(dir, f));
  // Development certificates: the missing files are generated, and a complete development
  // set (its CA key beside it) another user owns is refused, as a folder to generate into is.
  if (config.devCertificates) await ensureDevCertificates(dir);
  else if (need.some((p) => !existsSync(p))) {
    throw new Error(
      `TLS files missing in ${dir} (need ca.crt, server.crt, server.key); set TESSERA_DEV_CERTIFICATES=true to generate development ones`,
    );
  }
  const keys: [string, string][] = [[need[2]!, "TLS private key"]];
  // Not read here, but it signs the client certificates ca.crt makes this server trust.
  const caKey = join(dir, "ca.key");
  if (existsSync(caKey)) keys.push([caKey, "CA private key"]);
  for (const [path, what] of keys) {
    const problem = openToOthers(path, what);
    if (problem === null) continue;
    if (openKey === "refuse") throw new Error(`refusing ${problem}`);
    openKey(problem);
  }
  const [ca, cert, key] = need.map((p) => readFileSync(p));
  const notAfter = expiryOf(cert!);
  // Each file on its own first, so that the error (at start, or logged by a reload that keeps
  // the previous files) names the file at fault: OpenSSL's own says only "no start line".
  const named = <T>(file: string, parse: () => T): T => {
    try {
      return parse();
    } catch (err) {
      throw new Error(`bad TLS material in ${dir}: ${file}: ${(err as Error).message}`);
    }
  };
  const anchors: TrustAnchors = named("ca.crt", () => trustAnchors(ca!));
  const served = named("server.crt", () => new X509Certificate(cert!));
  const privateKey = named("server.key", () => createPrivateKey(key!));
  if (!served.checkPrivateKey(privateKey))
    throw new Error(`bad TLS material in ${dir}: server.key is not the key of server.crt`);
  const crlPath = join(dir, "ca.crl");
  if (!existsSync(crlPath)) return { ca: ca!, cert: cert!, key: key!, anchors, revoked: new Set(), notAfter };
  const crl = readFileSync(crlPath);
  const revoked = named("ca.crl", () => revokedSerials(crl));
  return { ca: ca!, cert: cert!, key: key!, crl, anchors, revoked, notAfter };
}

/** The notAfter of the first certificate in `pem`, in unix seconds (undefined when it does not parse). */
function expiryOf(pem: Buffer): number | undefined {
  try {
    const at = Date.parse(new X509Certificate(pem).validTo);
    return Number.isNaN(at) ? undefined : Math.floor(at / 1000);
  } catch {
    // A server.crt that does not parse fails the secure context with its own message.
    return undefined;
  }
}

/**
 * Check that the TLS files load and match, before anything is created: run before the
 * bootstrap so that a start that cannot serve creates no admin (the port is checked
 * earlier still, see listen-check.ts). With `generate: false`, missing files that
 * development certificates would fill are not an error and nothing is written: `tessera
 * serve` checks the files present before it touches the database, and generates the
 * missing ones only once the database is reached and migrated (an unreachable database
 * then fails the start with no files written).
 */
export async function preflight(cfg: Config["server"], options: { generate?: boolean } = {}): Promise<void> {
  if (cfg.insecurePlaintext) return;
  if (options.generate === false && cfg.devCertificates) {
    const missing = ["ca.crt", "server.crt", "server.key"].some((f) => !existsSync(join(cfg.certDir, f)));
    if (missing) return;
  }
  const m = await loadTlsMaterial(cfg);
  try {
    createSecureContext({ ca: m.ca, cert: m.cert, key: m.key, ...(m.crl ? { crl: m.crl } : {}) });
  } catch (err) {
    throw new Error(`bad TLS material in ${cfg.certDir}: ${(err as Error).message}`);
  }
}
