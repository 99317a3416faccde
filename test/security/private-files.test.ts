import { X509Certificate } from "node:crypto";
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app.js";
import { ensureDevCertificates } from "../../src/certs/index.js";
import { startServer } from "../../src/server.js";
import {
  createTestCerts,
  dropSchema,
  POSTGRES,
  SQLITE,
  silentLogger,
  startTestServer,
  testConfig,
} from "../helpers.js";
import { captureLogs } from "./fixtures.js";

/**
 * The server's own secrets on disk: a master key file (`auth.masterKeyFile`) or a TLS private
 * key (`server.key`) that any user of the machine can read is refused at start with a message
 * that says how to fix it, as the SDK refuses such a credentials file; a file its owner (and
 * group) alone read is served.
 */
describe("secret files readable by others", () => {
  const KEY = Buffer.alloc(32, 9).toString("base64");

  it("refuses a master key file any user can read, and starts on one its owner and group read", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-kek-"));
    const file = join(dir, "kek");
    writeFileSync(file, `${KEY}\n`);
    chmodSync(file, 0o644);
    const url = `sqlite:${join(dir, "t.db")}`;
    await expect(
      createApp(testConfig(url, { auth: { masterKeyFile: file } }), { logger: silentLogger }),
    ).rejects.toThrow(`refusing master key file ${file}: its mode 0644 lets any user of the machine read it`);
    chmodSync(file, 0o640);
    const app = await createApp(testConfig(url, { auth: { masterKeyFile: file } }), { logger: silentLogger });
    await app.close();
  });

  it("refuses to serve with a TLS or CA private key any user can read", async () => {
    const certs = await createTestCerts();
    const key = join(certs.dir, "server.key");
    chmodSync(key, 0o604);
    const app = await createApp(testConfig("sqlite::memory:", { server: { certDir: certs.dir } }), {
      logger: silentLogger,
    });
    try {
      await expect(startServer(app)).rejects.toThrow(`refusing TLS private key ${key}: its mode 0604`);
      chmodSync(key, 0o600);
      // The CA's key beside it signs the client certificates the server trusts (mTLS identities).
      const caKey = join(certs.dir, "ca.key");
      chmodSync(caKey, 0o644);
      await expect(startServer(app)).rejects.toThrow(`refusing CA private key ${caKey}: its mode 0644`);
      chmodSync(caKey, 0o640);
      const server = await startServer(app);
      await server.close(0);
    } finally {
      await app.close();
    }
  });

  it("says how to fix it in a container too, and calls a key others can only write writable", async () => {
    const certs = await createTestCerts();
    const key = join(certs.dir, "server.key");
    chmodSync(key, 0o602);
    const app = await createApp(testConfig("sqlite::memory:", { server: { certDir: certs.dir } }), {
      logger: silentLogger,
    });
    try {
      const refusal = await startServer(app).then(
        () => "started",
        (err: Error) => err.message,
      );
      expect(refusal).toContain(
        `refusing TLS private key ${key}: its mode 0602 lets any user of the machine write it`,
      );
      // A Kubernetes secret volume is 0644 by default; rootless podman shows a bind-mounted
      // file as nobody's, which tempts an o+r.
      expect(refusal).toContain("defaultMode: 0400");
      expect(refusal).toContain("fsGroup");
      expect(refusal).toContain("--userns=keep-id");
    } finally {
      await app.close();
    }
  });

  it("loads renewed certificates on a reload while a key is open to others, warning once per file, and counts failed reloads", async () => {
    // Refusing at a reload protects nothing (the running server holds the key) and kept the
    // old certificate served until it expired.
    const logs = captureLogs("info");
    const ts = await startTestServer(SQLITE, {}, undefined, { logger: logs.logger });
    const metric = async (name: string) => {
      const line = (await ts.app.metrics!.scrape()).split("\n").find((l) => l.startsWith(`${name} `));
      return Number(line?.split(" ")[1]);
    };
    const served = () =>
      new Promise<string>((resolve, reject) => {
        const socket = tlsConnect(
          { host: "127.0.0.1", port: ts.server.port, ca: ts.certs.ca, ALPNProtocols: ["h2"] },
          () => {
            resolve(socket.getPeerX509Certificate()!.fingerprint256);
            socket.destroy();
          },
        );
        socket.once("error", reject);
      });
    try {
      const before = await served();
      const notAfter = (pem: Buffer) => Math.floor(Date.parse(new X509Certificate(pem).validTo) / 1000);
      expect(await metric("tessera_tls_certificate_expiry_seconds")).toBe(
        notAfter(readFileSync(join(ts.certs.dir, "server.crt"))),
      );
      rmSync(join(ts.certs.dir, "server.crt"));
      rmSync(join(ts.certs.dir, "server.key"));
      await ensureDevCertificates(ts.certs.dir);
      chmodSync(join(ts.certs.dir, "server.key"), 0o644);
      chmodSync(join(ts.certs.dir, "ca.key"), 0o604);
      await ts.server.reloadTls();
      const renewed = readFileSync(join(ts.certs.dir, "server.crt"));
      expect(await served()).not.toBe(before);
      expect(await served()).toBe(new X509Certificate(renewed).fingerprint256);
      expect(await metric("tessera_tls_certificate_expiry_seconds")).toBe(notAfter(renewed));
      const warned = logs.lines.filter((l) => l.level === 40 && String(l.msg).startsWith("TLS reload"));
      expect(warned.map((l) => String(l.msg).match(/(server|ca)\.key/)![0]).sort()).toEqual([
        "ca.key",
        "server.key",
      ]);
      expect(String(warned[0]!.msg)).toContain("chmod 600");

      const failures = await metric("tessera_tls_reload_failures_total");
      writeFileSync(join(ts.certs.dir, "ca.crl"), "not a crl");
      await expect(ts.server.reloadTls()).rejects.toThrow();
      expect(await metric("tessera_tls_reload_failures_total")).toBe(failures + 1);
      expect(await served()).toBe(new X509Certificate(renewed).fingerprint256);
    } finally {
      await ts.close();
    }
  });

  it.skipIf(process.env.TESSERA_TEST_SKIP_POSTGRES === "1")(
    "creates no admin before a refused master key: its generated password is shown by the start that serves",
    async () => {
      // The admin's generated password is printed once, by the start that created it; a start
      // that then stopped on its master key showed it to no one, and every later start found
      // the admin made, with a password nobody knows.
      const url = POSTGRES.url();
      const noPassword = { admin: { password: undefined } };
      try {
        await expect(
          createApp(testConfig(url, { ...noPassword, auth: { masterKey: undefined } }), {
            logger: silentLogger,
          }),
        ).rejects.toThrow(/PostgreSQL needs a master key/);
        const app = await createApp(testConfig(url, noPassword), { logger: silentLogger });
        try {
          expect(app.bootstrap.created).toBe(true);
          expect(app.bootstrap.generatedPassword).toBeTruthy();
        } finally {
          await app.close();
        }
      } finally {
        await dropSchema(url);
      }
    },
  );
});
