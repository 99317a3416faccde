import { createHash, createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import type { Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type App, createApp } from "../src/app.js";
import { hashPool } from "../src/auth/hash-pool.js";
import { hashSecret } from "../src/auth/password.js";
import { SECRET_CACHE_ENTRY_BYTES, sharedDigestKey, VerifiedSecretCache } from "../src/auth/secret-cache.js";
import { parseToken } from "../src/auth/token-format.js";
import { createApiTokenVerifier } from "../src/auth/token-verifier.js";
import type { ConfigInput } from "../src/config.js";
import { startServer, type TesseraServer } from "../src/server.js";
import { CredentialRepository } from "../src/storage/repositories/credentials.js";
import type { SqlRunner } from "../src/storage/sql.js";
import { rejection } from "./errors-util.js";
import {
  clientFor,
  createTestCerts,
  DATABASES,
  dropSchema,
  silentLogger,
  TEST_MASTER_KEY,
  type TestCerts,
  testConfig,
} from "./helpers.js";
import { adminLogin, bearerMachine, clients, short } from "./machine-fixtures.js";

/**
 * Shared verification (issue 20, item 4): a secret PBKDF2 verified on one instance is
 * recognised on another (and after its own cache evicted it) with one HMAC against the
 * keyed digest stored beside the credential, never weakening revocation or rotation.
 * Two real instances on one database, each serving TLS; PBKDF2 runs are counted with
 * the process-wide hash pool that both instances use.
 */

/** Entries the instances' in-process caches hold: far fewer than the tokens used below. */
const CACHE_ENTRIES = 4;

const hashes = () => hashPool().stats().started;
const nextTurn = () => new Promise<void>((resolve) => setTimeout(resolve, 20));

/** Wait until `done()` holds (a digest is stored without holding up the request that verified it). */
async function until(done: () => boolean | Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (await done()) return;
    await nextTurn();
  }
  throw new Error(`timed out waiting for ${what}`);
}

const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/** A well-formed token (valid checksum) with the id of `token` and a secret nobody issued. */
function wrongSecret(token: string, prefix: string): string {
  const parsed = parseToken(token, [prefix]);
  if (parsed === null || parsed === "malformed") throw new Error("not a token");
  const head = `${prefix}${parsed.id}${"x".repeat(32)}`;
  let v = crc32(head) >>> 0;
  let sum = "";
  do {
    sum = ALPHABET[v % 62] + sum;
    v = Math.floor(v / 62);
  } while (v > 0);
  return `${head}${sum.padStart(6, "0")}`;
}

interface Instance {
  app: App;
  server: TesseraServer;
  transport: Transport;
}

describe.each(DATABASES)("shared verification of token secrets ($name)", (db) => {
  let dir: string;
  let url: string;
  let certs: TestCerts;
  let a: Instance;
  let b: Instance;
  let adminJwt: string;
  let masterKey: Buffer;

  async function instance(overrides: ConfigInput = {}): Promise<Instance> {
    const app = await createApp(
      testConfig(url, {
        ...overrides,
        server: { certDir: certs.dir },
        auth: { tokens: { cacheMaxBytes: CACHE_ENTRIES * SECRET_CACHE_ENTRY_BYTES } },
      }),
      { logger: silentLogger },
    );
    const server = await startServer(app);
    const { createConnectTransport } = await import("@connectrpc/connect-node");
    const transport = createConnectTransport({
      baseUrl: server.url,
      httpVersion: "2",
      nodeOptions: { ca: certs.ca },
    });
    return { app, server, transport };
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tessera-shared-"));
    url = db.name === "sqlite" ? `sqlite:${join(dir, "tessera.db")}` : db.url();
    certs = await createTestCerts();
    a = await instance();
    b = await instance();
    adminJwt = await adminLogin(a.transport);
    masterKey =
      db.name === "sqlite"
        ? Buffer.from(readFileSync(join(dir, "master.key"), "utf8").trim(), "base64")
        : Buffer.from(TEST_MASTER_KEY, "base64");
  });
  afterAll(async () => {
    for (const i of [b, a]) {
      await i?.server.close(0);
      await i?.app.close();
    }
    await dropSchema(url);
    rmSync(dir, { recursive: true, force: true });
  });

  /** A new user (on A) with a personal access token. */
  async function patOnA() {
    const username = `sv-${short()}`;
    const password = "shared verification password";
    await clients(a.transport, adminJwt).users.createUser({ username, password, scopes: ["cluster:read"] });
    const jwt = (await clientFor(UserService, a.transport).login({ username, password })).accessToken;
    const created = await clientFor(TokenService, a.transport, jwt).createPersonalAccessToken({ name: "sv" });
    return { ...created, jwt, username };
  }

  const me = (i: Instance, token: string) => clientFor(UserService, i.transport, token).getCurrentUser({});
  const reason = async (p: Promise<unknown>) => (await rejection(p)).reason;
  const digestOf = async (id: string) =>
    (
      await a.app.sql.get<{ verified_digest: string | null }>(
        "select verified_digest from api_tokens where id = ?",
        [id],
      )
    )?.verified_digest ?? null;

  it("accepts on instance B, without PBKDF2, a token first verified on instance A", async () => {
    const pat = await patOnA();
    const ownInvalidations = a.app.sql.cacheStats().invalidations;
    const before = hashes();
    expect((await me(a, pat.token)).username).toBe(pat.username);
    expect(hashes() - before).toBe(1);
    await until(async () => (await digestOf(pat.id)) !== null, "the digest stored");
    // Storing it did not empty A's own state cache (SQLite's triggers and PostgreSQL's alike).
    expect(a.app.sql.cacheStats().invalidations).toBe(ownInvalidations);

    const invalidations = b.app.sql.cacheStats().invalidations;
    const shared = b.app.secrets.stats().sharedHits;
    const onB = hashes();
    expect((await me(b, pat.token)).username).toBe(pat.username);
    expect((await me(b, pat.token)).username).toBe(pat.username);
    expect(hashes() - onB).toBe(0);
    expect(b.app.secrets.stats().sharedHits - shared).toBe(1);
    if (db.name === "postgres") {
      // Storing a digest announces nothing: B's state cache was not emptied by it.
      expect(b.app.sql.cacheStats().invalidations).toBe(invalidations);
    }
  });

  it("accepts on B without PBKDF2 a token whose row B read before A stored the digest", async () => {
    const pat = await patOnA();
    // A wrong secret on B first: B reads (and, on PostgreSQL, keeps) the row with no digest yet.
    expect(await reason(me(b, wrongSecret(pat.token, "tsr_pat_")))).toBe("TOKEN_INVALID");
    await me(a, pat.token);
    await until(async () => (await digestOf(pat.id)) !== null, "the digest stored");
    const before = hashes();
    expect((await me(b, pat.token)).username).toBe(pat.username);
    expect(hashes() - before).toBe(0);
  });

  it("accepts a machine token on B without PBKDF2 once A verified it, and refuses it on B once rotated", async () => {
    const m = await bearerMachine(a.transport, adminJwt, []);
    await clients(a.transport, m.token).machines.checkAuthentication({});
    await until(async () => a.app.secrets.stats().sharedWrites > 0, "a digest stored");
    await until(
      async () =>
        (
          await a.app.sql.get<{ d: string | null }>(
            "select c.verified_digest as d from machine_credentials c where c.machine_user_id = ?",
            [m.machine.id],
          )
        )?.d != null,
      "the machine credential's digest stored",
    );
    const before = hashes();
    expect((await clients(b.transport, m.token).machines.checkAuthentication({})).machineUserId).toBe(
      m.machine.id,
    );
    expect(hashes() - before).toBe(0);

    // Rotated with no grace period: the old credential's row goes, and its digest with it.
    await clients(a.transport, adminJwt).machines.rotateMachineUserCredentials({ id: m.machine.id });
    const after = hashes();
    expect(await reason(clients(b.transport, m.token).machines.checkAuthentication({}))).toBe(
      "TOKEN_INVALID",
    );
    expect(hashes() - after).toBe(0);
  });

  it("accepts a shared-digest token where the IP's failure budget is spent, and still reserves it for one that must hash", async () => {
    const c = await instance({
      rateLimit: {
        enabled: true,
        authFailuresPerIpPerMinute: 3,
        perIpPerMinute: 10_000,
        perPrincipalPerMinute: 10_000,
      },
    });
    try {
      const verified = await patOnA();
      const unused = await patOnA();
      await me(a, verified.token);
      await until(async () => (await digestOf(verified.id)) !== null, "the digest stored");
      // Spend the IP's budget on C with wrong secrets (each reserved before its PBKDF2).
      for (let i = 0; i < 3; i++)
        expect(await reason(me(c, wrongSecret(unused.token, "tsr_pat_")))).toBe("TOKEN_INVALID");
      expect(await reason(me(c, wrongSecret(unused.token, "tsr_pat_")))).toBe("RATE_LIMITED");
      const before = hashes();
      // Needs no PBKDF2 (C never saw it, but its digest is shared): accepted whatever the IP spent.
      expect((await me(c, verified.token)).username).toBe(verified.username);
      // Needs PBKDF2 (verified nowhere yet): the budget is asked first, and it is spent.
      expect(await reason(me(c, unused.token))).toBe("RATE_LIMITED");
      expect(hashes() - before).toBe(0);
    } finally {
      await c.server.close(0);
      await c.app.close();
    }
  });

  it("refuses on B a revoked token whose digest is stored", async () => {
    const pat = await patOnA();
    await me(a, pat.token);
    await me(b, pat.token);
    await until(async () => (await digestOf(pat.id)) !== null, "the digest stored");
    await clientFor(TokenService, a.transport, pat.jwt).revokePersonalAccessToken({ id: pat.id });
    expect(await reason(me(b, pat.token))).toBe("TOKEN_REVOKED");
    expect(await reason(me(a, pat.token))).toBe("TOKEN_REVOKED");
  });

  it("refuses the old secret once the stored hash is replaced, though its digest is still stored", async () => {
    const pat = await patOnA();
    await me(a, pat.token);
    await until(async () => (await digestOf(pat.id)) !== null, "the digest stored");
    const digest = await digestOf(pat.id);
    // A rotation by hand: a new hash (of a secret the old token does not hold), the old digest left in place.
    await a.app.sql.run("update api_tokens set secret_hash = ? where id = ?", [
      await hashSecret("another secret entirely", 1_000),
      pat.id,
    ]);
    expect(await digestOf(pat.id)).toBe(digest);
    const before = hashes();
    expect(await reason(me(b, pat.token))).toBe("TOKEN_INVALID");
    expect(await reason(me(a, pat.token))).toBe("TOKEN_INVALID");
    // Each refusal was PBKDF2's: the stale digest matched nothing.
    expect(hashes() - before).toBe(2);
  });

  it("stores a digest keyed with the master key, not a hash anyone could compute from a guess", async () => {
    const pat = await patOnA();
    await me(a, pat.token);
    await until(async () => (await digestOf(pat.id)) !== null, "the digest stored");
    const stored = (await digestOf(pat.id))!;
    const row = (await a.app.sql.get<{ secret_hash: string }>(
      "select secret_hash from api_tokens where id = ?",
      [pat.id],
    ))!;
    const parsed = parseToken(pat.token, ["tsr_pat_"]);
    if (parsed === null || parsed === "malformed") throw new Error("not a token");
    const namespace = `token:${pat.id}`;

    // Nothing unkeyed: no plain hash of the secret or the token, in any encoding.
    const unkeyed = new Set<string>();
    for (const input of [parsed.secret, pat.token, `${namespace}\0${row.secret_hash}\0${parsed.secret}`])
      for (const alg of ["sha256", "sha512", "sha1", "md5"])
        for (const enc of ["hex", "base64", "base64url"] as const) {
          unkeyed.add(createHash(alg).update(input).digest(enc));
          unkeyed.add(createHmac(alg, "").update(input).digest(enc));
        }
    expect(unkeyed.has(stored)).toBe(false);
    expect(stored).not.toContain(parsed.secret);

    // It is the HMAC under the key derived from the master key, and under no other key.
    const expected = createHmac("sha256", sharedDigestKey(masterKey))
      .update(`v1\0${namespace}\0${row.secret_hash}\0${parsed.secret}`)
      .digest("base64url");
    expect(stored).toBe(expected);
    const withKey = new VerifiedSecretCache({ maxBytes: 1 << 20, sharedKey: sharedDigestKey(masterKey) });
    expect(withKey.knows(namespace, parsed.secret, row.secret_hash, stored)).toBe(true);
    const withoutKey = new VerifiedSecretCache({ maxBytes: 1 << 20, sharedKey: randomBytes(32) });
    expect(withoutKey.knows(namespace, parsed.secret, row.secret_hash, stored)).toBe(false);
    // The master key itself (not the derived key) does not make it either.
    const rawKey = new VerifiedSecretCache({ maxBytes: 1 << 20, sharedKey: masterKey });
    expect(rawKey.knows(namespace, parsed.secret, row.secret_hash, stored)).toBe(false);
  });

  it("reads a shared digest with the row it reads anyway: no query of its own once stored", async () => {
    const pat = await patOnA();
    const statements: string[] = [];
    const sql = a.app.sql;
    const counting: SqlRunner = {
      ...sql,
      cachedGet(q, p) {
        statements.push(q);
        return sql.cachedGet(q, p);
      },
      get(q, p) {
        statements.push(q);
        return sql.get(q, p);
      },
      run(q, p) {
        statements.push(q);
        return sql.run(q, p);
      },
    };
    const verifier = createApiTokenVerifier({
      credentials: new CredentialRepository(counting),
      secrets: a.app.secrets,
      lastUsed: a.app.lastUsed,
      patPrefix: "tsr_pat_",
      apiKeyPrefix: "tsr_key_",
    });
    const verify = async () => {
      statements.length = 0;
      await verifier.verify(pat.token, {
        requestId: "t",
        ip: "127.0.0.1",
        certificate: null,
        principal: null,
      });
      await until(async () => (await digestOf(pat.id)) !== null, "the digest stored");
      return statements.map((q) => q.split(" ").slice(0, 2).join(" "));
    };
    // First use anywhere: the row, the digest read past the state cache (none yet), PBKDF2, the digest stored.
    expect(await verify()).toEqual(["select k.id,", "select verified_digest", "update api_tokens"]);
    // In-process hit, and then (cache emptied: another instance, a restart, an eviction) the
    // digest the row brought: the row read alone either way.
    expect(await verify()).toEqual(["select k.id,"]);
    a.app.secrets.clear();
    const before = hashes();
    expect(await verify()).toEqual(["select k.id,"]);
    expect(hashes() - before).toBe(0);
  });

  it("serves a working set larger than the in-process caches with no PBKDF2 once digests are shared", async () => {
    const pats: Awaited<ReturnType<typeof patOnA>>[] = [];
    for (let i = 0; i < CACHE_ENTRIES * 3; i++) pats.push(await patOnA());
    const first = hashes();
    for (const p of pats) await me(a, p.token);
    expect(hashes() - first).toBe(pats.length);
    await until(
      async () => (await Promise.all(pats.map((p) => digestOf(p.id)))).every((d) => d !== null),
      "every digest stored",
    );

    const evictions = a.app.secrets.stats().evictions;
    const shared = a.app.secrets.stats().sharedHits + b.app.secrets.stats().sharedHits;
    const before = hashes();
    for (let round = 0; round < 3; round++)
      for (const p of pats) {
        expect((await me(a, p.token)).username).toBe(p.username);
        expect((await me(b, p.token)).username).toBe(p.username);
      }
    expect(hashes() - before).toBe(0);
    // The caches hold 4 of 12 tokens used round-robin: every call missed them and was
    // answered by a shared digest instead.
    expect(a.app.secrets.stats().evictions - evictions).toBeGreaterThan(0);
    expect(a.app.secrets.stats().sharedHits + b.app.secrets.stats().sharedHits - shared).toBe(
      2 * 3 * pats.length,
    );
    expect(a.app.secrets.stats().entries).toBeLessThanOrEqual(CACHE_ENTRIES);
  });
});
