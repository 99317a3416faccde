import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type App, createApp } from "../src/app.js";
import { hashPool } from "../src/auth/hash-pool.js";
import { hashSecret } from "../src/auth/password.js";
import { sharedDigestKey, VerifiedSecretCache } from "../src/auth/secret-cache.js";
import { parseToken } from "../src/auth/token-format.js";
import { CredentialRepository } from "../src/storage/repositories/credentials.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  dropSchema,
  memoryTransport,
  POSTGRES,
  TEST_MASTER_KEY,
  testConfig,
} from "./helpers.js";
import { capturingLogger, type OutageApp, startOutageApp } from "./outage-helpers.js";

/**
 * Shared digests of verified secrets (`verified_digest`, issue 20 item 4) are an
 * optimisation: a digest that cannot be read costs a PBKDF2, never the call (issue 21's
 * faults), and a master-key rotation clears the digests keyed from the previous key.
 */

const hashes = () => hashPool().stats().started;
const READ_FAILED = "verified-secret digest not readable; verifying with PBKDF2 until it is";

/** A user with `n` personal access tokens, created through the app's whole pipeline. */
async function patsOf(app: App, n: number, name = `dig-${Date.now().toString(36)}`) {
  const transport = memoryTransport(app);
  const users = clientFor(UserService, transport);
  const admin = (await users.login({ username: "admin", password: ADMIN_PASSWORD })).accessToken;
  const password = "a password long enough";
  await clientFor(UserService, transport, admin).createUser({ username: name, password, scopes: [] });
  const jwt = (await users.login({ username: name, password })).accessToken;
  const tokens = clientFor(TokenService, transport, jwt);
  const created = [];
  for (let i = 0; i < n; i++) {
    const { token, id } = await tokens.createPersonalAccessToken({ name: `t${i}` });
    const parsed = parseToken(token, ["tsr_pat_"]);
    if (parsed === null || parsed === "malformed") throw new Error("not a PAT");
    created.push({ token, id, publicId: parsed.id, secret: parsed.secret });
  }
  return { created, transport };
}

describe("a stored digest that cannot be read", () => {
  it("is answered by PBKDF2 against the stored hash, counted, and logged once per run of failures", async () => {
    const { logger, log } = capturingLogger();
    const cache = new VerifiedSecretCache({
      maxBytes: 1 << 20,
      sharedKey: sharedDigestKey(Buffer.alloc(32, 1)),
      logger,
    });
    const storedHash = await hashSecret("the right secret", 1_000);
    let readable = false;
    const source = (saved: string[]) => ({
      stored: null,
      fresh: async () => {
        if (!readable) throw Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
        return null;
      },
      save: async (digest: string) => void saved.push(digest),
    });
    const saved: string[] = [];
    const before = hashes();
    expect(await cache.verify("token:a", "the right secret", storedHash, source(saved))).toBe(true);
    expect(await cache.verify("token:b", "the right secret", storedHash, source(saved))).toBe(true);
    // A wrong secret is still refused: PBKDF2 decides.
    expect(await cache.verify("token:c", "a wrong secret", storedHash, source(saved))).toBe(false);
    expect(hashes() - before).toBe(3);
    expect(cache.stats().sharedReadFailures).toBe(3);
    expect(log.count(READ_FAILED)).toBe(1);
    readable = true;
    expect(await cache.verify("token:d", "the right secret", storedHash, source(saved))).toBe(true);
    expect(log.count("verified-secret digests readable again")).toBe(1);
    readable = false;
    expect(await cache.verify("token:e", "the right secret", storedHash, source(saved))).toBe(true);
    expect(log.count(READ_FAILED)).toBe(2);
    // No secret and no digest in what was logged.
    expect(JSON.stringify(log.lines)).not.toMatch(/the right secret|a wrong secret/);
  });
});

describe.skipIf(!DATABASES.includes(POSTGRES))("a digest read cut off from PostgreSQL", () => {
  let env: OutageApp | undefined;
  afterEach(async () => {
    await env?.close();
    env = undefined;
  });

  it("verifies a token whose row was read with PBKDF2, instead of failing the call", async () => {
    env = await startOutageApp("postgres");
    const { created } = await patsOf(env.app, 2);
    const credentials = new CredentialRepository(env.app.sql);
    // The rows as the verifier read them (no digest yet: never used).
    const rows = [];
    for (const t of created) rows.push((await credentials.apiToken(t.publicId))!);
    expect(rows.every((r) => r.verifiedDigest === null)).toBe(true);
    await env.cut();
    const before = hashes();
    const failures = env.app.secrets.stats().sharedReadFailures;
    for (const [i, t] of created.entries()) {
      const row = rows[i]!;
      // The digest read meets the lost database (a real reset connection): PBKDF2 answers.
      await expect(
        env.app.secrets.verify(`token:${row.id}`, t.secret, row.secretHash, credentials.sharedDigest(row)),
      ).resolves.toBe(true);
    }
    expect(hashes() - before).toBe(2);
    expect(env.app.secrets.stats().sharedReadFailures - failures).toBe(2);
    expect(env.log.count(READ_FAILED)).toBe(1);
    await env.restore();
  });
});

describe.each(DATABASES)("a master-key rotation ($name)", (db) => {
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it("clears the shared digests keyed from the previous key; the next use stores one keyed from the new key", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-rotate-"));
    const url = db.name === "sqlite" ? `sqlite:${join(dir, "tessera.db")}` : db.url();
    cleanup.push(async () => {
      await dropSchema(url);
      rmSync(dir, { recursive: true, force: true });
    });
    const oldKey = TEST_MASTER_KEY;
    const newKey = Buffer.alloc(32, 9).toString("base64");
    const first = await createApp(testConfig(url, { auth: { masterKey: oldKey } }), {
      logger: capturingLogger().logger,
    });
    const { created, transport } = await patsOf(first, 3);
    for (const t of created) await clientFor(UserService, transport, t.token).getCurrentUser({});
    const digests = async (app: App) =>
      (
        await app.sql.all<{ id: string; verified_digest: string | null }>(
          "select id, verified_digest from api_tokens",
        )
      ).filter((r) => r.verified_digest !== null);
    for (const end = Date.now() + 20_000; (await digests(first)).length < 3 && Date.now() < end; )
      await new Promise((r) => setTimeout(r, 20));
    const oldDigests = await digests(first);
    expect(oldDigests).toHaveLength(3);
    await first.close();

    const { logger, log } = capturingLogger();
    const second = await createApp(
      testConfig(url, { auth: { masterKey: newKey, previousMasterKeys: [oldKey] } }),
      { logger },
    );
    cleanup.push(() => second.close());
    expect(await digests(second)).toHaveLength(0);
    expect(log.lines.find((l) => /master key rotated/.test(String(l.msg)))).toMatchObject({
      digestsCleared: 3,
    });
    // Every token still works (PBKDF2 once), and its new digest is the new key's.
    const t = created[0]!;
    const before = hashes();
    const me = await clientFor(UserService, memoryTransport(second), t.token).getCurrentUser({});
    expect(me.username).toMatch(/^dig-/);
    expect(hashes() - before).toBe(1);
    for (const end = Date.now() + 20_000; (await digests(second)).length < 1 && Date.now() < end; )
      await new Promise((r) => setTimeout(r, 20));
    const [fresh] = await digests(second);
    expect(fresh?.verified_digest).toBeTruthy();
    expect(fresh!.verified_digest).not.toBe(oldDigests.find((d) => d.id === fresh!.id)?.verified_digest);

    // A restart still in rotation (nothing left to reseal) clears nothing.
    await second.close();
    cleanup.pop();
    const third = await createApp(
      testConfig(url, { auth: { masterKey: newKey, previousMasterKeys: [oldKey] } }),
      { logger: capturingLogger().logger },
    );
    cleanup.push(() => third.close());
    expect(await digests(third)).toHaveLength(1);
  });
});
