import { chmodSync, mkdirSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { type App, createApp } from "../../src/app.js";
import { loadMasterKey, MASTER_KEY_FILE_NAME, openPrivateJwk } from "../../src/auth/master-key.js";
import type { ConfigInput } from "../../src/config.js";
import { startServer, type TesseraServer } from "../../src/server.js";
import { parseDatabaseUrl } from "../../src/storage/orm.js";
import {
  ADMIN_PASSWORD,
  createTestCerts,
  DATABASES,
  dropSchema,
  SQLITE,
  silentLogger,
  type TestCerts,
  type TestDatabase,
  testConfig,
} from "../helpers.js";

const OTHER_KEY = Buffer.alloc(32, 9).toString("base64");

/** A database URL that survives a restart: a file for SQLite, one schema for PostgreSQL. */
function durableUrl(db: TestDatabase): string {
  if (db.name === "postgres") return db.url();
  return `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-keys-")), "data", "tessera.db")}`;
}

interface Running {
  app: App;
  server: TesseraServer;
  users: ReturnType<typeof createClient<typeof UserService>>;
  close(): Promise<void>;
}

/** A real server over TLS on `url`, as `tessera serve` would start it. */
async function serve(url: string, certs: TestCerts, overrides: ConfigInput = {}): Promise<Running> {
  const app = await createApp(
    testConfig(url, { ...overrides, server: { certDir: certs.dir, ...overrides.server } }),
    { logger: silentLogger },
  );
  const server = await startServer(app);
  const transport = createGrpcTransport({ baseUrl: server.url, nodeOptions: { ca: certs.ca } });
  return {
    app,
    server,
    users: createClient(UserService, transport),
    async close() {
      await server.close(0);
      await app.close();
    },
  };
}

async function rows(app: App): Promise<{ kid: string; private_jwk: string }[]> {
  return app.storage.em.getConnection().execute("select kid, private_jwk from signing_keys order by kid");
}

describe.each(DATABASES)("signing keys at rest on $name", (db) => {
  let certs: TestCerts;
  const urls: string[] = [];
  const url = () => {
    const u = durableUrl(db);
    urls.push(u);
    return u;
  };
  beforeAll(async () => {
    certs = await createTestCerts();
  });
  afterAll(async () => {
    for (const u of urls) await dropSchema(u);
  });

  it("stores the private signing key sealed, with no JWK member in clear", async () => {
    const s = await serve(url(), certs);
    try {
      const stored = await rows(s.app);
      expect(stored.length).toBeGreaterThan(0);
      for (const row of stored) {
        expect(row.private_jwk).toMatch(/^v1:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+$/);
        // Quoted members only: the ciphertext is base64url, so a bare "OKP" can occur in it by chance.
        expect(row.private_jwk).not.toContain('"d"');
        expect(row.private_jwk).not.toContain('"kty"');
        // It is the private key, sealed with the configured master key for this row alone.
        const mk = loadMasterKey(s.app.config.auth, parseDatabaseUrl(s.app.config.database.url));
        expect(JSON.parse(openPrivateJwk(mk, row.kid, row.private_jwk)).d).toBeTypeOf("string");
        expect(() => openPrivateJwk(mk, `${row.kid}x`, row.private_jwk)).toThrow(/master key/);
      }
    } finally {
      await s.close();
    }
  });

  it("verifies tokens minted before a restart with the same master key", async () => {
    const u = url();
    const first = await serve(u, certs);
    const { accessToken } = await first.users.login({ username: "admin", password: ADMIN_PASSWORD });
    const before = await rows(first.app);
    await first.close();

    const second = await serve(u, certs);
    try {
      const me = await second.users.getCurrentUser(
        {},
        { headers: { authorization: `Bearer ${accessToken}` } },
      );
      expect(me.username).toBe("admin");
      // The same key signs on: no new key was generated.
      expect(await rows(second.app)).toEqual(before);
    } finally {
      await second.close();
    }
  });

  it("refuses to start with a wrong master key and leaves the stored keys untouched", async () => {
    const u = url();
    const first = await serve(u, certs);
    const before = await rows(first.app);
    await first.close();

    await expect(
      createApp(testConfig(u, { auth: { masterKey: OTHER_KEY } }), { logger: silentLogger }),
    ).rejects.toThrow(/was encrypted with master key \S+, which is not the configured one/);

    const again = await serve(u, certs);
    try {
      expect(await rows(again.app)).toEqual(before);
    } finally {
      await again.close();
    }
  });

  it("rotates the master key: keys sealed with a previous one are resealed under the new one at start", async () => {
    const u = url();
    const first = await serve(u, certs, { auth: { masterKey: OTHER_KEY, masterKeyFile: undefined } });
    const { accessToken } = await first.users.login({ username: "admin", password: ADMIN_PASSWORD });
    const [before] = await rows(first.app);
    await first.close();

    const NEW_KEY = Buffer.alloc(32, 5).toString("base64");
    const second = await serve(u, certs, { auth: { masterKey: NEW_KEY, previousMasterKeys: [OTHER_KEY] } });
    try {
      const [after] = await rows(second.app);
      expect(after!.kid).toBe(before!.kid);
      expect(after!.private_jwk.split(":")[1]).not.toBe(before!.private_jwk.split(":")[1]);
      const me = await second.users.getCurrentUser(
        {},
        { headers: { authorization: `Bearer ${accessToken}` } },
      );
      expect(me.username).toBe("admin");
    } finally {
      await second.close();
    }
    // Dropping the previous key: that start keeps only the new key's envelope, so the old key
    // alone no longer opens them (while the rotation was under way it did: instances not yet
    // restarted sign on and may restart).
    const third = await serve(u, certs, { auth: { masterKey: NEW_KEY, previousMasterKeys: [] } });
    try {
      const [dropped] = await rows(third.app);
      expect(dropped!.private_jwk).toMatch(/^v1:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+$/);
    } finally {
      await third.close();
    }
    await expect(
      createApp(testConfig(u, { auth: { masterKey: OTHER_KEY } }), { logger: silentLogger }),
    ).rejects.toThrow(/not the configured one/);
  });

  it("seals a signing key stored in clear by an older version on the next start", async () => {
    const u = url();
    const first = await serve(u, certs);
    const { accessToken } = await first.users.login({ username: "admin", password: ADMIN_PASSWORD });
    const mk = loadMasterKey(first.app.config.auth, parseDatabaseUrl(u));
    const [row] = await rows(first.app);
    const clear = openPrivateJwk(mk, row!.kid, row!.private_jwk);
    await first.app.storage.em
      .getConnection()
      .execute("update signing_keys set private_jwk = ? where kid = ?", [clear, row!.kid]);
    await first.close();

    const second = await serve(u, certs);
    try {
      const [sealed] = await rows(second.app);
      expect(sealed!.kid).toBe(row!.kid);
      expect(sealed!.private_jwk.startsWith("v1:")).toBe(true);
      expect(sealed!.private_jwk).not.toContain('"d"');
      const me = await second.users.getCurrentUser(
        {},
        { headers: { authorization: `Bearer ${accessToken}` } },
      );
      expect(me.username).toBe("admin");
    } finally {
      await second.close();
    }
  });

  it("caps the lifetime of every minted access token at auth.maxTokenTtl", async () => {
    const s = await serve(url(), certs, {
      auth: { maxTokenTtl: 600, jwt: { accessTokenTtl: 7 * 24 * 3600 } },
    });
    try {
      const login = await s.users.login({ username: "admin", password: ADMIN_PASSWORD });
      const claims = decodeJwt(login.accessToken);
      expect(claims.exp! - claims.iat!).toBe(600);
      expect(Number(login.accessTokenExpiresAt?.seconds ?? claims.exp)).toBe(claims.exp);
      // A lifetime asked for explicitly (machine tokens, rotation grace periods) is capped too.
      const issued = await s.app.jwt.issue({
        subject: "x",
        tenantId: "t",
        scopes: [],
        kind: "machine",
        ttlSeconds: 30 * 24 * 3600,
      });
      const c2 = decodeJwt(issued.token);
      expect(c2.exp! - c2.iat!).toBe(600);
    } finally {
      await s.close();
    }
  });
});

describe("master key sources", () => {
  it("refuses to start on PostgreSQL without a master key, saying which setting is missing", async () => {
    const pg = DATABASES.find((d) => d.name === "postgres");
    if (!pg) return;
    const u = pg.url();
    try {
      await expect(
        createApp(testConfig(u, { auth: { masterKey: undefined } }), { logger: silentLogger }),
      ).rejects.toThrow(/PostgreSQL needs a master key.*TESSERA_MASTER_KEY/);
    } finally {
      await dropSchema(u);
    }
  });

  it("reads the master key from auth.masterKeyFile", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-mk-"));
    const file = join(dir, "kek");
    writeFileSync(file, `${OTHER_KEY}\n`, { mode: 0o600 });
    const u = `sqlite:${join(dir, "t.db")}`;
    const certs = await createTestCerts();
    const s = await serve(u, certs, { auth: { masterKeyFile: file } });
    await s.close();
    // Sealed with the file's key: the generated one next to the database does not exist.
    expect(() => statSync(join(dir, MASTER_KEY_FILE_NAME))).toThrow();
    await expect(
      createApp(testConfig(u, { auth: { masterKey: Buffer.alloc(32, 1).toString("base64") } }), {
        logger: silentLogger,
      }),
    ).rejects.toThrow(/not the configured one/);
  });
});

describe("file modes of the embedded database", () => {
  const mode = (p: string) => statSync(p).mode & 0o777;

  it("creates the data folder 0700 and the database, its WAL files and the master key 0600", async () => {
    const u = durableUrl(SQLITE);
    const file = u.slice("sqlite:".length);
    const dir = join(file, "..");
    const certs = await createTestCerts();
    const s = await serve(u, certs);
    try {
      await s.users.login({ username: "admin", password: ADMIN_PASSWORD });
      expect(mode(dir)).toBe(0o700);
      for (const p of [file, `${file}-wal`, `${file}-shm`, join(dir, MASTER_KEY_FILE_NAME)])
        expect(mode(p)).toBe(0o600);
    } finally {
      await s.close();
    }
  });

  it("tightens a data folder and database files left readable by others", async () => {
    const dir = join(mkdtempSync(join(tmpdir(), "tessera-keys-")), "data");
    mkdirSync(dir, { mode: 0o755 });
    chmodSync(dir, 0o755);
    const file = join(dir, "tessera.db");
    const certs = await createTestCerts();
    const first = await serve(`sqlite:${file}`, certs);
    await first.close();
    chmodSync(dir, 0o755);
    for (const p of [file, join(dir, MASTER_KEY_FILE_NAME)]) chmodSync(p, 0o644);

    const second = await serve(`sqlite:${file}`, certs);
    try {
      expect(mode(dir)).toBe(0o700);
      for (const p of [file, join(dir, MASTER_KEY_FILE_NAME)]) expect(mode(p)).toBe(0o600);
    } finally {
      await second.close();
    }
  });
});

describe("rotating SQLite's generated master.key as the README says", () => {
  it("takes the new key written into master.key, with the old one in previousMasterKeys for one start", async () => {
    const certs = await createTestCerts();
    const u = durableUrl(SQLITE);
    const keyFile = join(u.slice("sqlite:".length), "..", MASTER_KEY_FILE_NAME);
    const first = await serve(u, certs);
    const { accessToken } = await first.users.login({ username: "admin", password: ADMIN_PASSWORD });
    await first.close();
    const old = readFileSync(keyFile, "utf8").trim();

    const NEW_KEY = Buffer.alloc(32, 7).toString("base64");
    writeFileSync(keyFile, `${NEW_KEY}\n`);
    const second = await serve(u, certs, { auth: { previousMasterKeys: [old] } });
    try {
      const me = await second.users.getCurrentUser(
        {},
        { headers: { authorization: `Bearer ${accessToken}` } },
      );
      expect(me.username).toBe("admin");
    } finally {
      await second.close();
    }
    // Then without the old key: the file alone opens every signing key, and the old key none.
    const third = await serve(u, certs);
    try {
      const me = await third.users.getCurrentUser(
        {},
        { headers: { authorization: `Bearer ${accessToken}` } },
      );
      expect(me.username).toBe("admin");
    } finally {
      await third.close();
    }
    writeFileSync(keyFile, `${old}\n`);
    await expect(createApp(testConfig(u), { logger: silentLogger })).rejects.toThrow(
      /not the configured one/,
    );
  });
});
