import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app.js";
import { startServer } from "../../src/server.js";
import { createTestCerts, silentLogger, testConfig } from "../helpers.js";

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

  it("refuses to serve with a TLS private key any user can read", async () => {
    const certs = await createTestCerts();
    const key = join(certs.dir, "server.key");
    chmodSync(key, 0o604);
    const app = await createApp(testConfig("sqlite::memory:", { server: { certDir: certs.dir } }), {
      logger: silentLogger,
    });
    try {
      await expect(startServer(app)).rejects.toThrow(`refusing TLS private key ${key}: its mode 0604`);
      chmodSync(key, 0o600);
      const server = await startServer(app);
      await server.close(0);
    } finally {
      await app.close();
    }
  });
});
