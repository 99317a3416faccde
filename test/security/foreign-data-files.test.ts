import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app.js";
import { MASTER_KEY_FILE_NAME } from "../../src/auth/master-key.js";
import { createCertificateAuthority, ensureDevCertificates } from "../../src/certs/dev-ca.js";
import { preflight } from "../../src/server/tls-material.js";
import { createTestCerts, silentLogger, testConfig } from "../helpers.js";

/**
 * The embedded database's folder and files hold password hashes and the signing keys, sealed
 * with the master key generated beside them. Where another local user owns that folder (a
 * `data` folder made in /tmp before the server first ran there), or has planted one of the
 * files (a master key of their choosing, a database file or WAL they keep open), a server
 * that uses them anyway hands that user the keys: the owner of the folder can swap the
 * files between starts; the owner of a file reads it through a descriptor opened before
 * the server tightened its mode (root tightens any file, and the owner can loosen it
 * again), or a WAL or rollback journal SQLite replays into the database when it opens it.
 * Start-up must refuse them, naming the path.
 */
const OTHER_UID = 65534; // nobody
const root = typeof process.getuid === "function" && process.getuid() === 0;

/** A fresh parent folder of ours. */
function parent(): string {
  return mkdtempSync(join(tmpdir(), "tessera-foreign-"));
}

/** Why the app on `file` refused to start ("started" when it did not: then it is closed). */
async function refusal(file: string): Promise<string> {
  const certs = await createTestCerts();
  return createApp(testConfig(`sqlite:${file}`, { server: { certDir: certs.dir } }), {
    logger: silentLogger,
  }).then(
    async (app) => {
      await app.close();
      return "started";
    },
    (err: Error) => err.message,
  );
}

describe.skipIf(!root)("a database folder or file another user owns", () => {
  it("refuses a data folder owned by another user, before writing anything into it", async () => {
    const dir = join(parent(), "data");
    mkdirSync(dir, { mode: 0o777 });
    chmodSync(dir, 0o777);
    chownSync(dir, OTHER_UID, OTHER_UID);
    const file = join(dir, "tessera.db");
    expect(await refusal(file)).toMatch(
      /database folder .*: it is owned by another user, uid 65534 \(nobody\)/,
    );
    expect(existsSync(file)).toBe(false);
    expect(existsSync(join(dir, MASTER_KEY_FILE_NAME))).toBe(false);
  });

  it("refuses a master key another user planted beside the database", async () => {
    const dir = join(parent(), "data");
    mkdirSync(dir, { mode: 0o700 });
    const key = join(dir, MASTER_KEY_FILE_NAME);
    writeFileSync(key, `${Buffer.alloc(32, 7).toString("base64")}\n`, { mode: 0o644 });
    chownSync(key, OTHER_UID, OTHER_UID);
    expect(await refusal(join(dir, "tessera.db"))).toMatch(/master key file .*: it is owned by another user/);
  });

  it("refuses a WAL another user planted beside the target of a linked database file, where SQLite reads it", async () => {
    const base = parent();
    const [data, shared] = [join(base, "data"), join(base, "shared")];
    mkdirSync(data, { mode: 0o700 });
    mkdirSync(shared, { mode: 0o700 });
    chmodSync(shared, 0o1777);
    symlinkSync(join(shared, "tessera.db"), join(data, "tessera.db"));
    writeFileSync(join(shared, "tessera.db-wal"), "", { mode: 0o666 });
    chownSync(join(shared, "tessera.db-wal"), OTHER_UID, OTHER_UID);
    expect(await refusal(join(data, "tessera.db"))).toMatch(
      /database file .*shared\/tessera\.db-wal: it is owned by another user/,
    );
  });

  it.each(["tessera.db", "tessera.db-wal", "tessera.db-shm", "tessera.db-journal"])(
    "refuses a %s another user planted",
    async (name) => {
      const dir = join(parent(), "data");
      mkdirSync(dir, { mode: 0o700 });
      const planted = join(dir, name);
      writeFileSync(planted, "", { mode: 0o666 });
      chownSync(planted, OTHER_UID, OTHER_UID);
      expect(await refusal(join(dir, "tessera.db"))).toMatch(
        new RegExp(`database file .*${name}: it is owned by another user`),
      );
    },
  );
});

/**
 * The development CA is generated into the certificate folder when it lacks the server's
 * files (`server.devCertificates`, on by default). A folder another user owns, or a CA they
 * planted there (ca.crt and ca.key, no server files yet), would have this start sign its
 * server certificate with their CA and trust that CA for client certificates (mTLS
 * machine users): start-up refuses them.
 */
describe.skipIf(!root)("a certificate folder or CA another user owns", () => {
  /** Why a start with development certificates in `dir` refused ("started" when it did not). */
  async function refusal(dir: string): Promise<string> {
    const config = testConfig(`sqlite:${join(parent(), "tessera.db")}`, {
      server: { certDir: dir, devCertificates: true },
    });
    return preflight(config.server).then(
      () => "started",
      (err: Error) => err.message,
    );
  }

  it("refuses a certificate folder owned by another user, writing nothing into it", async () => {
    const dir = join(parent(), "certs");
    mkdirSync(dir, { mode: 0o777 });
    chownSync(dir, OTHER_UID, OTHER_UID);
    expect(await refusal(dir)).toMatch(/certificate folder .*: it is owned by another user/);
    expect(existsSync(join(dir, "server.key"))).toBe(false);
  });

  it("refuses to sign the server's certificate with a CA another user planted", async () => {
    const dir = join(parent(), "certs");
    await createCertificateAuthority(dir, { commonName: "Planted CA" });
    for (const f of ["ca.crt", "ca.key"]) chownSync(join(dir, f), OTHER_UID, OTHER_UID);
    expect(await refusal(dir)).toMatch(/development CA file .*ca\.(crt|key): it is owned by another user/);
    expect(existsSync(join(dir, "server.crt"))).toBe(false);
  });

  it("refuses a complete development set (CA key included) another user planted in their folder", async () => {
    const dir = join(parent(), "certs");
    await ensureDevCertificates(dir);
    for (const f of ["ca.crt", "ca.key", "server.crt", "server.key"])
      chownSync(join(dir, f), OTHER_UID, OTHER_UID);
    chownSync(dir, OTHER_UID, OTHER_UID);
    expect(await refusal(dir)).toMatch(/certificate folder .*: it is owned by another user/);
  });

  it("generates the set in a folder of its own", async () => {
    const dir = join(parent(), "certs");
    expect(await refusal(dir)).toBe("started");
    expect(existsSync(join(dir, "server.key"))).toBe(true);
  });
});
