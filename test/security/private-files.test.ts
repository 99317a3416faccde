import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app.js";
import { startServer } from "../../src/server.js";
import { createTestCerts, dropSchema, POSTGRES, silentLogger, testConfig } from "../helpers.js";

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

  it("creates no admin before a refused master key: its generated password is shown by the start that serves", async () => {
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
  });
});
