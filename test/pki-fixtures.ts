import { webcrypto, X509Certificate } from "node:crypto";
import * as x509 from "@peculiar/x509";
import { short } from "./machine-fixtures.js";

/** Certificates made for the tests of client certificate chains (intermediates, expiries). */

export const DAY_MS = 86_400_000;
/** ECDSA P-256 with SHA-256, as WebCrypto and @peculiar/x509 take it. */
export const EC = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" };

/** A new P-256 key pair. */
export async function ecKeys(): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(EC, true, ["sign", "verify"])) as webcrypto.CryptoKeyPair;
}

/** A private key as PKCS#8 PEM. */
export async function keyPem(key: webcrypto.CryptoKey): Promise<Buffer> {
  const der = Buffer.from(await webcrypto.subtle.exportKey("pkcs8", key));
  return Buffer.from(`-----BEGIN PRIVATE KEY-----\n${der.toString("base64")}\n-----END PRIVATE KEY-----\n`);
}

/**
 * A root CA (ten days), an intermediate it signed that ends in two days, and a client
 * certificate the intermediate signed that outlives it: the client sends the intermediate.
 */
export async function intermediateChain() {
  const now = Date.now();
  const ca = async (
    name: string,
    days: number,
    issuer?: { name: x509.Name; keys: webcrypto.CryptoKeyPair },
  ) => {
    const keys = await ecKeys();
    const extensions = [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey as never),
    ];
    const validity = { notBefore: new Date(now - DAY_MS), notAfter: new Date(now + days * DAY_MS) };
    const cert = issuer
      ? await x509.X509CertificateGenerator.create({
          serialNumber: "0b02",
          subject: [{ CN: [name] }],
          issuer: issuer.name,
          ...validity,
          signingAlgorithm: EC,
          publicKey: keys.publicKey as never,
          signingKey: issuer.keys.privateKey as never,
          extensions,
        })
      : await x509.X509CertificateGenerator.createSelfSigned({
          serialNumber: "0b01",
          name: [{ CN: [name] }],
          ...validity,
          signingAlgorithm: EC,
          keys: keys as never,
          extensions,
        });
    return { cert, keys };
  };
  const root = await ca(`Root ${short()}`, 10);
  const inter = await ca(`Intermediate ${short()}`, 2, { name: root.cert.subjectName, keys: root.keys });
  const leafKeys = await ecKeys();
  const leaf = await x509.X509CertificateGenerator.create({
    serialNumber: "0b03",
    subject: [{ CN: [`client-${short()}`] }],
    issuer: inter.cert.subjectName,
    notBefore: new Date(now - DAY_MS),
    notAfter: new Date(now + 5 * DAY_MS),
    signingAlgorithm: EC,
    publicKey: leafKeys.publicKey as never,
    signingKey: inter.keys.privateKey as never,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
    ],
  });
  return {
    rootPem: root.cert.toString("pem"),
    interNotAfter: inter.cert.notAfter.getTime(),
    chainPem: `${leaf.toString("pem")}\n${inter.cert.toString("pem")}\n`,
    key: await keyPem(leafKeys.privateKey),
    fingerprint: new X509Certificate(leaf.toString("pem")).fingerprint256.replace(/:/g, "").toLowerCase(),
  };
}
