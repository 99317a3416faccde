import { spawnSync } from "node:child_process";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm, stat, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as tls from "node:tls";
import { credentials } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  certificateFingerprint,
  createCertificateAuthority,
  createClientCertificate,
  ensureDevCertificates,
  writeCrl,
} from "../src/certs/index.js";
import { chainsTo, trustAnchors } from "../src/certs/trust-anchors.js";

const CLIENT_AUTH = "1.3.6.1.5.5.7.3.2";
const SERVER_AUTH = "1.3.6.1.5.5.7.3.1";

// openssl is only a second opinion here; the module itself never shells out. Machines without it skip those checks.
const hasOpenssl = spawnSync("openssl", ["version"], { timeout: 30_000 }).status === 0;

function openssl(args: string[]): { status: number | null; output: string } {
  const r = spawnSync("openssl", args, { encoding: "utf8", timeout: 30_000 });
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

const tempDirs: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "tessera-certs-test-"));
  tempDirs.push(dir);
  return dir;
}

afterAll(async () => {
  await Promise.all(tempDirs.map((d) => rm(d, { recursive: true, force: true })));
});

async function modeOf(path: string): Promise<number> {
  return (await stat(path)).mode & 0o777;
}

/** How one mutual-TLS attempt ended: did the client get the server's reply, and what did each side report. */
interface Outcome {
  ok: boolean;
  clientError?: string;
  serverError?: string;
}

/**
 * Start a mutual-TLS server on an ephemeral port that answers "ok" to every authorized client, and try one
 * client against it. Under TLS 1.3 the client finishes its handshake before the server judges the client
 * certificate, so a refusal reaches the client only as a closed socket; the server-side socket's
 * `authorizationError` carries the actual reason.
 */
async function tryMutualTls(
  server: { ca: Buffer; cert: Buffer; key: Buffer; crl?: Buffer },
  client: { ca: Buffer; cert: Buffer; key: Buffer },
): Promise<Outcome> {
  const srv = tls.createServer({ requestCert: true, rejectUnauthorized: true, ...server }, (socket) =>
    socket.end("ok"),
  );
  let serverError: string | undefined;
  srv.on("tlsClientError", (err: Error, socket: tls.TLSSocket) => {
    // With rejectUnauthorized Node destroys the socket after the handshake; the verdict is authorizationError.
    serverError = `${String(socket.authorizationError ?? "")} ${err.message}`.trim();
  });
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address() as { port: number };
  try {
    const outcome = await new Promise<Outcome>((resolve) => {
      // No servername: Node then checks the server certificate against the IP SAN 127.0.0.1.
      const socket = tls.connect({ host: "127.0.0.1", port, ...client });
      let data = "";
      let clientError: string | undefined;
      socket.setEncoding("utf8");
      socket.on("data", (chunk: string) => {
        data += chunk;
      });
      socket.on("error", (err: NodeJS.ErrnoException) => {
        clientError = `${err.code ?? ""} ${err.message}`;
      });
      socket.on("close", () => resolve({ ok: data === "ok", ...(clientError ? { clientError } : {}) }));
    });
    // The server may log its verdict a tick after the client saw the close.
    await new Promise((resolve) => setImmediate(resolve));
    return serverError ? { ...outcome, serverError } : outcome;
  } finally {
    await new Promise<void>((resolve) => srv.close(() => resolve()));
  }
}

describe("development certificates", () => {
  let dir: string;
  let clientOut: string;
  let ca: Buffer;
  let serverCert: Buffer;
  let serverKey: Buffer;
  let client: Awaited<ReturnType<typeof createClientCertificate>>;

  beforeAll(async () => {
    dir = join(await tempDir(), "certs");
    expect(await ensureDevCertificates(dir)).toEqual({ created: true, dir });
    clientOut = join(await tempDir(), "sdk-folder", "alice");
    client = await createClientCertificate(dir, "alice", clientOut, { sanUri: "spiffe://tenant/app" });
    ca = await readFile(join(dir, "ca.crt"));
    serverCert = await readFile(join(dir, "server.crt"));
    serverKey = await readFile(join(dir, "server.key"));
  });

  it("creates the CA and server files, keys readable only by the owner in a 0700 folder", async () => {
    expect(await modeOf(dir)).toBe(0o700);
    expect(await modeOf(join(dir, "ca.key"))).toBe(0o600);
    expect(await modeOf(join(dir, "server.key"))).toBe(0o600);
    for (const name of ["ca.key", "server.key"]) {
      expect(await readFile(join(dir, name), "utf8")).toMatch(/^-----BEGIN PRIVATE KEY-----\n/);
    }
    for (const name of ["ca.crt", "server.crt"]) {
      expect(await readFile(join(dir, name), "utf8")).toMatch(/^-----BEGIN CERTIFICATE-----\n/);
    }
  });

  it("leaves every existing file untouched on a second call", async () => {
    const names = ["ca.crt", "ca.key", "server.crt", "server.key"];
    const before = await Promise.all(names.map((n) => readFile(join(dir, n), "utf8")));
    expect(await ensureDevCertificates(dir)).toEqual({ created: false, dir });
    expect(await Promise.all(names.map((n) => readFile(join(dir, n), "utf8")))).toEqual(before);
  });

  it("makes a CA certificate that is a critical-basicConstraints CA with an ECDSA P-256 key", () => {
    const caCert = new X509Certificate(ca);
    expect(caCert.ca).toBe(true);
    expect(caCert.publicKey.asymmetricKeyType).toBe("ec");
    expect(caCert.publicKey.asymmetricKeyDetails?.namedCurve).toBe("prime256v1");
    expect(caCert.verify(caCert.publicKey)).toBe(true);
    const validDays = (Date.parse(caCert.validTo) - Date.parse(caCert.validFrom)) / 86_400_000;
    expect(validDays).toBeGreaterThan(3649);
    expect(validDays).toBeLessThan(3651);
  });

  it("issues a server certificate for localhost, 127.0.0.1 and ::1 with serverAuth, signed by the CA", () => {
    const caCert = new X509Certificate(ca);
    const cert = new X509Certificate(serverCert);
    expect(cert.ca).toBe(false);
    expect(cert.verify(caCert.publicKey)).toBe(true);
    expect(cert.checkIssued(caCert)).toBe(true);
    expect(cert.checkHost("localhost")).toBe("localhost");
    expect(cert.checkIP("127.0.0.1")).toBe("127.0.0.1");
    expect(cert.checkIP("::1")).toBe("::1");
    expect(cert.checkHost("example.com")).toBeUndefined();
    expect(cert.keyUsage).toEqual([SERVER_AUTH]);
    expect(cert.checkPrivateKey(createPrivateKey(serverKey))).toBe(true);
    // 16 random bytes with the sign bit clear: 32 hex digits, positive.
    expect(cert.serialNumber).toMatch(/^[0-7][0-9A-F]{31}$/);
  });

  it.skipIf(!hasOpenssl)("passes openssl verify for both the server and the client certificate", () => {
    const r = openssl(["verify", "-CAfile", join(dir, "ca.crt"), join(dir, "server.crt"), client.certPath]);
    expect(r.output).toContain(`${join(dir, "server.crt")}: OK`);
    expect(r.output).toContain(`${client.certPath}: OK`);
    expect(r.status).toBe(0);
    expect(
      openssl(["verify", "-purpose", "sslserver", "-CAfile", join(dir, "ca.crt"), join(dir, "server.crt")])
        .status,
    ).toBe(0);
    expect(
      openssl(["verify", "-purpose", "sslclient", "-CAfile", join(dir, "ca.crt"), client.certPath]).status,
    ).toBe(0);
  });

  it("mints a client certificate with the CN, the SAN URI and clientAuth, signed by the CA", async () => {
    const caCert = new X509Certificate(ca);
    const cert = new X509Certificate(await readFile(client.certPath));
    expect(cert.subject).toBe("CN=alice");
    expect(cert.subjectAltName).toBe("URI:spiffe://tenant/app");
    expect(cert.keyUsage).toEqual([CLIENT_AUTH]);
    expect(cert.verify(caCert.publicKey)).toBe(true);
    expect(cert.checkPrivateKey(createPrivateKey(await readFile(client.keyPath)))).toBe(true);
    const validDays = (Date.parse(cert.validTo) - Date.parse(cert.validFrom)) / 86_400_000;
    expect(Math.round(validDays)).toBe(825);
  });

  it("writes the SDK folder layout: client.crt, client.key with mode 0600 and a copy of ca.crt", async () => {
    expect(client).toMatchObject({
      certPath: join(clientOut, "client.crt"),
      keyPath: join(clientOut, "client.key"),
      caPath: join(clientOut, "ca.crt"),
    });
    expect(await modeOf(client.keyPath)).toBe(0o600);
    expect(await readFile(client.keyPath, "utf8")).toMatch(/^-----BEGIN PRIVATE KEY-----\n/);
    expect(await readFile(client.caPath)).toEqual(ca);
  });

  it("omits the subjectAltName when no SAN URI is given and keeps names with DN metacharacters literal", async () => {
    const out = await tempDir();
    const c = await createClientCertificate(dir, "svc, O=evil+x", out);
    const cert = new X509Certificate(await readFile(c.certPath));
    expect(cert.subjectAltName).toBeUndefined();
    // One CN attribute holding the whole name, not an injected O= attribute.
    expect(cert.toLegacyObject().subject).toEqual({ CN: "svc, O=evil+x" });
  });

  it("rejects an empty client name and a SAN URI that is not an absolute ASCII URI", async () => {
    const out = await tempDir();
    await expect(createClientCertificate(dir, "", out)).rejects.toThrow(/client name/);
    await expect(createClientCertificate(dir, "bob", out, { sanUri: "not a uri" })).rejects.toThrow(
      /SAN URI/,
    );
    await expect(createClientCertificate(dir, "bob", out, { sanUri: "spiffe://tenänt/app" })).rejects.toThrow(
      /SAN URI/,
    );
  });

  it("reports a fingerprint equal to node's fingerprint256 without colons, lowercased", async () => {
    const pem = await readFile(client.certPath, "utf8");
    const expected = new X509Certificate(pem).fingerprint256.replace(/:/g, "").toLowerCase();
    expect(client.sha256Fingerprint).toBe(expected);
    expect(certificateFingerprint(pem)).toBe(expected);
    expect(expected).toMatch(/^[0-9a-f]{64}$/);
  });

  it("loads the client files into @grpc/grpc-js SSL credentials", async () => {
    const [caPem, keyPem, certPem] = await Promise.all(
      [client.caPath, client.keyPath, client.certPath].map((p) => readFile(p)),
    );
    expect(() => credentials.createSsl(caPem, keyPem, certPem)).not.toThrow();
    // grpc-js really builds the TLS context here: a key that does not match the certificate is refused.
    expect(() => credentials.createSsl(caPem, serverKey, certPem)).toThrow();
  });

  it("accepts the client certificate on a real mutual-TLS server", async () => {
    const outcome = await tryMutualTls(
      { ca, cert: serverCert, key: serverKey },
      { ca, cert: await readFile(client.certPath), key: await readFile(client.keyPath) },
    );
    expect(outcome).toEqual({ ok: true });
  });

  it("rejects a client certificate issued by a foreign CA", async () => {
    const foreign = await tempDir();
    await createCertificateAuthority(foreign, { commonName: "Foreign CA" });
    const intruder = await createClientCertificate(foreign, "mallory", join(foreign, "mallory"));
    const outcome = await tryMutualTls(
      { ca, cert: serverCert, key: serverKey },
      { ca, cert: await readFile(intruder.certPath), key: await readFile(intruder.keyPath) },
    );
    expect(outcome.ok).toBe(false);
    expect(outcome.serverError).toMatch(
      /^(UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\b/,
    );
  });

  it("refuses a revoked client once the CRL from writeCrl is configured, while others still connect", async () => {
    const revokedOut = await tempDir();
    const revoked = await createClientCertificate(dir, "revoked-client", revokedOut);
    const crlPath = await writeCrl(dir, [await readFile(revoked.certPath, "utf8")]);
    expect(crlPath).toBe(join(dir, "ca.crl"));
    const crl = await readFile(crlPath);
    expect(crl.toString("utf8")).toMatch(/^-----BEGIN X509 CRL-----\n/);
    const server = { ca, cert: serverCert, key: serverKey, crl };

    const refused = await tryMutualTls(server, {
      ca,
      cert: await readFile(revoked.certPath),
      key: await readFile(revoked.keyPath),
    });
    expect(refused.ok).toBe(false);
    expect(refused.serverError).toMatch(/^CERT_REVOKED\b/);

    const accepted = await tryMutualTls(server, {
      ca,
      cert: await readFile(client.certPath),
      key: await readFile(client.keyPath),
    });
    expect(accepted).toEqual({ ok: true });

    if (hasOpenssl) {
      const r = openssl([
        "verify",
        "-crl_check",
        "-CAfile",
        join(dir, "ca.crt"),
        "-CRLfile",
        crlPath,
        revoked.certPath,
      ]);
      expect(r.status).not.toBe(0);
      expect(r.output).toMatch(/certificate revoked/);
    }
  });

  it("overwrites ca.crl with exactly the given list, so an empty list lets a once-revoked client back in", async () => {
    const out = await tempDir();
    const pardoned = await createClientCertificate(dir, "pardoned", out);
    const credentialsOf = async () => ({
      ca,
      cert: await readFile(pardoned.certPath),
      key: await readFile(pardoned.keyPath),
    });
    await writeCrl(dir, [await readFile(pardoned.certPath, "utf8")]);
    const before = await tryMutualTls(
      { ca, cert: serverCert, key: serverKey, crl: await readFile(join(dir, "ca.crl")) },
      await credentialsOf(),
    );
    expect(before.ok).toBe(false);

    const crlPath = await writeCrl(dir, []);
    const after = await tryMutualTls(
      { ca, cert: serverCert, key: serverKey, crl: await readFile(crlPath) },
      await credentialsOf(),
    );
    expect(after).toEqual({ ok: true });
  });

  it("refuses to put a certificate from another CA on the CRL", async () => {
    const foreign = await tempDir();
    await createCertificateAuthority(foreign);
    const other = await createClientCertificate(foreign, "other", join(foreign, "other"));
    await expect(writeCrl(dir, [await readFile(other.certPath, "utf8")])).rejects.toThrow(
      /not issued by the CA/,
    );
  });
});

describe("certificate folders in unusual states", () => {
  it("names the missing ca.key path when asked to mint a client without the CA key", async () => {
    const dir = await tempDir();
    await ensureDevCertificates(dir);
    await unlink(join(dir, "ca.key"));
    const missing = join(dir, "ca.key");
    await expect(createClientCertificate(dir, "bob", join(dir, "bob"))).rejects.toThrow(missing);
    await expect(writeCrl(dir, [])).rejects.toThrow(missing);
  });

  it("names the missing ca.crt path when the CA folder is empty", async () => {
    const dir = await tempDir();
    await expect(createClientCertificate(dir, "bob", join(dir, "bob"))).rejects.toThrow(join(dir, "ca.crt"));
  });

  it("issues only the server certificate when the folder already holds a CA", async () => {
    const dir = await tempDir();
    await createCertificateAuthority(dir, { commonName: "Operator CA" });
    const caBefore = await readFile(join(dir, "ca.crt"));
    expect((await ensureDevCertificates(dir)).created).toBe(true);
    expect(await readFile(join(dir, "ca.crt"))).toEqual(caBefore);
    const server = new X509Certificate(await readFile(join(dir, "server.crt")));
    expect(server.verify(new X509Certificate(caBefore).publicKey)).toBe(true);
    expect(server.issuer).toBe("CN=Operator CA");
  });

  it("refuses to complete a folder holding server.crt without server.key instead of overwriting", async () => {
    const dir = await tempDir();
    await writeFile(join(dir, "server.crt"), "operator's certificate");
    await expect(ensureDevCertificates(dir)).rejects.toThrow(join(dir, "server.key"));
    expect(await readFile(join(dir, "server.crt"), "utf8")).toBe("operator's certificate");
  });

  it("adds extra hosts to the server certificate next to the defaults", async () => {
    const dir = await tempDir();
    await ensureDevCertificates(dir, { hosts: ["tessera.internal", "10.0.0.7"], validityDays: 30 });
    const cert = new X509Certificate(await readFile(join(dir, "server.crt")));
    expect(cert.checkHost("tessera.internal")).toBe("tessera.internal");
    expect(cert.checkIP("10.0.0.7")).toBe("10.0.0.7");
    expect(cert.checkHost("localhost")).toBe("localhost");
    expect(Math.round((Date.parse(cert.validTo) - Date.parse(cert.validFrom)) / 86_400_000)).toBe(30);
  });

  it("refuses to overwrite an existing CA with createCertificateAuthority", async () => {
    const dir = await tempDir();
    await createCertificateAuthority(dir);
    const before = await readFile(join(dir, "ca.key"));
    await expect(createCertificateAuthority(dir)).rejects.toThrow(join(dir, "ca.crt"));
    expect(await readFile(join(dir, "ca.key"))).toEqual(before);
    expect(await modeOf(join(dir, "ca.key"))).toBe(0o600);
  });
});

describe("trust anchors (a client certificate held to a replaced CA)", () => {
  it("chains a certificate to its own CA, in a bundle too, and not to a foreign CA or past its validity", async () => {
    const own = await tempDir();
    const foreign = await tempDir();
    await createCertificateAuthority(own, { commonName: "Own CA" });
    await createCertificateAuthority(foreign, { commonName: "Own CA" }); // same name, other key
    const minted = await createClientCertificate(own, "anchored", join(own, "client"), { validityDays: 30 });
    const leaf = new X509Certificate(await readFile(minted.certPath));
    const ownCa = await readFile(join(own, "ca.crt"));
    const foreignCa = await readFile(join(foreign, "ca.crt"));

    expect(chainsTo([leaf], trustAnchors(ownCa))).toBe(true);
    expect(chainsTo([leaf], trustAnchors(foreignCa))).toBe(false);
    expect(chainsTo([leaf], trustAnchors(Buffer.concat([foreignCa, ownCa])))).toBe(true);
    // The old root the handshake found, sent along, is no way in once it is no anchor.
    expect(chainsTo([leaf, new X509Certificate(ownCa)], trustAnchors(foreignCa))).toBe(false);
    expect(chainsTo([leaf], trustAnchors(ownCa), Date.now() + 31 * 86_400_000)).toBe(false);
    expect(trustAnchors(ownCa).key).toBe(trustAnchors(Buffer.from(ownCa)).key);
    expect(() => trustAnchors(Buffer.from("not a certificate"))).toThrow("no certificate");
  });
});
