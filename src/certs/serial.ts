/**
 * A certificate serial number as hex, in the one form it is compared in: lower case, without
 * leading zeros. Node's `getPeerCertificate().serialNumber` (OpenSSL's upper-case hex) and a
 * CRL entry's serial (the DER content octets, with a leading 00 when the high bit is set)
 * then read alike.
 */
export function normaliseSerial(hex: string): string {
  const s = hex.toLowerCase().replace(/^0+/, "");
  return s === "" ? "0" : s;
}
