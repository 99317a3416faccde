// Certificate revocation lists: the CA's signed list of revoked client serials, which the server
// reloads while running.

// Loaded before @peculiar/x509, which needs the Reflect metadata polyfill at import time (see issuing.ts).
import "reflect-metadata";
import { X509Certificate as NodeX509Certificate, type webcrypto } from "node:crypto";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import { replaceFile } from "./files.js";
import {
  authorityKeyId,
  BACKDATE_MS,
  CRL_FILE,
  checkValidityDays,
  DAY_MS,
  DEFAULT_CRL_DAYS,
  loadCa,
} from "./issuing.js";
import { normaliseSerial } from "./serial.js";

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
 * The serial numbers a CRL file revokes (PEM with one or more CRLs, or DER), normalised
 * ({@link normaliseSerial}). The server checks the certificate of every request against
 * them, so that a reloaded CRL stops a certificate on connections made before it too (the
 * TLS layer checks a CRL at the handshake only). Issuers are not compared: a serial revoked
 * by the CA's list is refused whichever CA issued it (fail closed).
 * @throws Error when the file holds no CRL that parses
 */
export function revokedSerials(crl: Buffer): Set<string> {
  const text = crl.toString("latin1");
  const ders: (ArrayBuffer | Uint8Array)[] = text.includes("-----BEGIN")
    ? x509.PemConverter.decode(text)
    : [new Uint8Array(crl)];
  if (ders.length === 0) throw new Error("the CRL file holds no CRL");
  const out = new Set<string>();
  for (const der of ders)
    for (const entry of new x509.X509Crl(der).entries) out.add(normaliseSerial(entry.serialNumber));
  return out;
}
