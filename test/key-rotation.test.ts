import { randomBytes } from "node:crypto";
import { base64url, decodeProtectedHeader, importJWK, SignJWT } from "jose";
import { afterEach, describe, expect, it } from "vitest";
import { createJwtService, type JwtService } from "../src/auth/jwt.js";
import { openPrivateJwk, parseMasterKey } from "../src/auth/master-key.js";
import { keyPrePublicationSeconds } from "../src/auth/signing-key-ring.js";
import { type ConfigInput, loadConfig } from "../src/config.js";
import { TesseraError } from "../src/errors.js";
import { initORM, type Storage } from "../src/storage/orm.js";
import { DATABASES, dropSchema, TEST_MASTER_KEY, testConfig } from "./helpers.js";

const masterKey = parseMasterKey(TEST_MASTER_KEY, "test");
const T0 = Date.parse("2026-12-04T00:00:00Z");
const S = 1000;

/** A clock the test moves by hand. */
function clock(start = T0) {
  let t = start;
  return { now: () => t, set: (ms: number) => (t = ms), advance: (ms: number) => (t += ms) };
}

type JwtInput = NonNullable<NonNullable<ConfigInput["auth"]>["jwt"]>;

const claims = { subject: "u1", tenantId: "t1", scopes: ["a"], kind: "user" as const };

async function reasonOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    if (err instanceof TesseraError) return `${err.reason}: ${err.message}`;
    throw err;
  }
  return "accepted";
}

describe.each(DATABASES)("signing keys on a schedule ($name)", (db) => {
  const opened: { storage: Storage; url: string }[] = [];
  const services: JwtService[] = [];
  afterEach(async () => {
    for (const s of services.splice(0)) s.close();
    for (const { storage, url } of opened.splice(0)) {
      await storage.close();
      await dropSchema(url);
    }
  });

  async function database(): Promise<Storage> {
    // A file for SQLite: two services on one database, as two processes would be.
    const url =
      db.name === "sqlite" ? `sqlite:/tmp/tessera-keys-${randomBytes(6).toString("hex")}.db` : db.url();
    const storage = await initORM({ url });
    opened.push({ storage, url });
    return storage;
  }

  async function service(
    storage: Storage,
    now: () => number,
    jwt: JwtInput = {},
    maxTokenTtl = 600,
  ): Promise<JwtService> {
    const config = testConfig("sqlite::memory:", { auth: { jwt, maxTokenTtl } });
    const s = await createJwtService({
      config: config.auth.jwt,
      storage,
      masterKey,
      maxTokenTtlSeconds: config.auth.maxTokenTtl,
      clock: now,
      refreshIntervalMs: 0,
      unknownKidGapMs: 0,
    });
    services.push(s);
    return s;
  }

  const kidOf = async (s: JwtService) => decodeProtectedHeader((await s.issue(claims)).token).kid;
  const published = (s: JwtService) => s.jwks().keys.map((k) => k.kid);

  it("publishes a rotated key at once and signs with it only from its activation", async () => {
    const c = clock();
    const storage = await database();
    const jwt = await service(storage, c.now, { keyRotationInterval: 1000, keyPrePublication: 60 });
    const first = await kidOf(jwt);
    const next = await jwt.rotate();
    expect(next!.activatesAt.getTime()).toBe(T0 + 60 * S);
    expect(published(jwt)).toEqual([next!.kid, first]);
    c.set(T0 + 60 * S - 1);
    expect(await kidOf(jwt)).toBe(first);
    const oldToken = (await jwt.issue(claims)).token;
    c.set(T0 + 60 * S);
    expect(await kidOf(jwt)).toBe(next!.kid);
    expect((await jwt.verify(oldToken)).sub).toBe("u1");
    const rows = await storage.em
      .getConnection()
      .execute<{ kid: string; generation: number }[]>(
        "select kid, generation from signing_keys order by generation",
      );
    expect(rows.map((r) => [r.kid, Number(r.generation)])).toEqual([
      [first, 1],
      [next!.kid, 2],
    ]);
  });

  it("rotates on the configured interval while running, and a restart does not rotate early", async () => {
    const c = clock();
    const storage = await database();
    const schedule = { keyRotationInterval: 100, keyPrePublication: 10 };
    let jwt = await service(storage, c.now, schedule);
    const first = await kidOf(jwt);
    // Due 10 s before the first key's 100 s are up: not a millisecond earlier.
    c.set(T0 + 90 * S - 1);
    await jwt.refresh();
    jwt.close();
    jwt = await service(storage, c.now, schedule);
    expect(published(jwt)).toEqual([first]);
    c.set(T0 + 90 * S);
    await jwt.refresh();
    const [second] = published(jwt);
    expect(published(jwt)).toEqual([second, first]);
    c.set(T0 + 95 * S);
    await jwt.refresh();
    jwt.close();
    jwt = await service(storage, c.now, schedule);
    expect(published(jwt)).toHaveLength(2);
    expect(await kidOf(jwt)).toBe(first);
    c.set(T0 + 100 * S);
    expect(await kidOf(jwt)).toBe(second);
    // The next one is due 100 s after the second activated, whatever the refresh times.
    c.set(T0 + 189 * S);
    await jwt.refresh();
    expect(published(jwt)).toHaveLength(2);
    c.set(T0 + 190 * S);
    await jwt.refresh();
    expect(published(jwt)).toHaveLength(3);
    c.set(T0 + 200 * S);
    expect(await kidOf(jwt)).toBe(published(jwt)[0]);
    expect(jwt.stats().keysCreated).toBe(1);
    expect(await storage.em.getConnection().execute("select kid from signing_keys")).toHaveLength(3);
  });

  it("keeps a retired key published and verifying until every token it signed has expired, then drops it", async () => {
    const c = clock();
    const storage = await database();
    // Longest token 600 s, clock skew 30 s.
    const schedule = { keyRotationInterval: 100, keyPrePublication: 10, clockSkew: 30, accessTokenTtl: 300 };
    const jwt = await service(storage, c.now, schedule, 600);
    const first = await kidOf(jwt);
    c.set(T0 + 90 * S);
    await jwt.refresh();
    // The last token the first key signs, just before its successor activates, for the longest lifetime.
    c.set(T0 + 100 * S - 1);
    const last = await jwt.issue({ ...claims, ttlSeconds: 10_000 });
    expect(decodeProtectedHeader(last.token).kid).toBe(first);
    expect(last.expiresAt.getTime()).toBeLessThanOrEqual(T0 + 700 * S);
    // Within its expiry (exact: no skew on Tessera's own exp): still accepted and published.
    c.set(T0 + 698 * S);
    const other = await service(storage, c.now, schedule, 600);
    expect(published(other)).toContain(first);
    expect(await reasonOf(other.verify(last.token))).toBe("accepted");
    // Past the retirement plus the longest lifetime: gone everywhere.
    c.set(T0 + 700 * S + 1);
    await other.refresh();
    expect(published(other)).not.toContain(first);
    expect(await reasonOf(other.verify(last.token))).toMatch(/^TOKEN_INVALID/);
    // The next rotation deletes its row, private key included (and only its row).
    await other.rotate();
    const kids = (
      await storage.em.getConnection().execute<{ kid: string }[]>("select kid from signing_keys")
    ).map((r) => r.kid);
    expect(kids).not.toContain(first);
    expect(kids).toHaveLength(3);
  });

  it("refuses a token its retired key claims to have signed after the retirement", async () => {
    const c = clock();
    const storage = await database();
    const schedule = { keyRotationInterval: 100, keyPrePublication: 10, clockSkew: 30, accessTokenTtl: 300 };
    const jwt = await service(storage, c.now, schedule, 600);
    const first = await kidOf(jwt);
    c.set(T0 + 90 * S);
    await jwt.refresh();
    const { issuer, audience } = testConfig("sqlite::memory:").auth.jwt;
    // The retired key's private half, as a leaked backup would give it.
    const [row] = await storage.em
      .getConnection()
      .execute<{ private_jwk: string; alg: string }[]>(
        "select private_jwk, alg from signing_keys where kid = ?",
        [first],
      );
    const privateKey = await importJWK(
      JSON.parse(openPrivateJwk(masterKey, first!, row!.private_jwk)),
      row!.alg,
    );
    const mint = (iatMs: number) =>
      new SignJWT({ tid: "t1", scope: "a", pk: "user" })
        .setProtectedHeader({ alg: row!.alg, kid: first!, typ: "at+jwt" })
        .setIssuer(issuer)
        .setAudience(audience)
        .setSubject("u1")
        .setIssuedAt(Math.floor(iatMs / 1000))
        .setExpirationTime(Math.floor(iatMs / 1000) + 60)
        .sign(privateKey);
    // Retired at T0 + 100 s. Now, 200 s later, the key still verifies what it signed before.
    c.set(T0 + 300 * S);
    await jwt.refresh();
    const before = await mint(T0 + 100 * S - 5 * S);
    const withinSkew = await mint(T0 + 100 * S + 20 * S);
    const after = await mint(T0 + 100 * S + 31 * S);
    const fresh = await mint(T0 + 300 * S);
    // `after` has expired by now (exp = iat + 60 s): it is checked again below, before its expiry.
    expect(await reasonOf(jwt.verify(fresh))).toBe(
      "TOKEN_INVALID: access token was signed after its key retired",
    );
    expect(await reasonOf(jwt.verify(after))).toMatch(
      /^TOKEN_(INVALID: access token was signed after|EXPIRED)/,
    );
    c.set(T0 + 100 * S + 25 * S);
    expect(await reasonOf(jwt.verify(before))).toBe("accepted");
    expect(await reasonOf(jwt.verify(withinSkew))).toBe("accepted");
    c.set(T0 + 100 * S + 35 * S);
    expect(await reasonOf(jwt.verify(after))).toBe(
      "TOKEN_INVALID: access token was signed after its key retired",
    );
  });

  it("creates one key when several instances find the rotation due at the same moment", async () => {
    for (let round = 0; round < 3; round++) {
      const c = clock();
      const storage = await database();
      const schedule = { keyRotationInterval: 100, keyPrePublication: 10 };
      const fleet = [];
      for (let i = 0; i < 4; i++) fleet.push(await service(storage, c.now, schedule));
      c.set(T0 + 95 * S);
      await Promise.all(fleet.map((s) => s.refresh()));
      const rows = await storage.em
        .getConnection()
        .execute<{ generation: number }[]>("select generation from signing_keys order by generation");
      expect(rows.map((r) => Number(r.generation))).toEqual([1, 2]);
      expect(fleet.reduce((n, s) => n + s.stats().keysCreated, 0)).toBe(2);
      // Every instance signs with the same key, and serves the same JWKS.
      await Promise.all(fleet.map((s) => s.refresh()));
      expect(new Set(fleet.map((s) => JSON.stringify(s.jwks()))).size).toBe(1);
      c.set(T0 + 100 * S);
      expect(new Set(await Promise.all(fleet.map(kidOf))).size).toBe(1);
    }
  });

  it("finds a key another instance activated at once when a token names it, reading at most once per gap", async () => {
    const c = clock();
    const storage = await database();
    const a = await service(storage, c.now);
    const b = await service(storage, c.now);
    await a.rotate({ immediate: true });
    const token = (await a.issue(claims)).token;
    const before = b.stats().refreshes;
    expect(await reasonOf(b.verify(token))).toBe("accepted");
    expect(b.stats().unknownKidRefetches).toBe(1);
    expect(b.stats().refreshes).toBe(before + 1);
    // A kid that is not a thumbprint is refused without a read.
    const [, p, sig] = token.split(".") as [string, string, string];
    const header = (kid: string) =>
      base64url.encode(JSON.stringify({ ...decodeProtectedHeader(token), kid }));
    expect(await reasonOf(b.verify(`${header("x")}.${p}.${sig}`))).toMatch(/^TOKEN_INVALID: unknown/);
    expect(b.stats().refreshes).toBe(before + 1);
  });
});

describe("unknown kids against the read budget", () => {
  it("shares reads among concurrent tokens with unknown kids and spaces them by the gap", async () => {
    const url = `sqlite:/tmp/tessera-kid-${randomBytes(6).toString("hex")}.db`;
    const storage = await initORM({ url });
    const config = testConfig(url);
    const jwt = await createJwtService({
      config: config.auth.jwt,
      storage,
      masterKey,
      refreshIntervalMs: 0,
      unknownKidGapMs: 100,
    });
    try {
      const token = (await jwt.issue(claims)).token;
      const [, p, sig] = token.split(".") as [string, string, string];
      const forged = () =>
        `${base64url.encode(JSON.stringify({ ...decodeProtectedHeader(token), kid: base64url.encode(randomBytes(32)) }))}.${p}.${sig}`;
      const started = performance.now();
      const before = jwt.stats().refreshes;
      // 20 waves of 50 distinct forged kids, 25 ms apart: 1,000 tokens in about 500 ms.
      const waves = [];
      for (let w = 0; w < 20; w++) {
        waves.push(Promise.all(Array.from({ length: 50 }, () => reasonOf(jwt.verify(forged())))));
        await new Promise((r) => setTimeout(r, 25));
      }
      const reasons = (await Promise.all(waves)).flat();
      const elapsed = performance.now() - started;
      expect(new Set(reasons)).toEqual(new Set(["TOKEN_INVALID: unknown signing key"]));
      const reads = jwt.stats().refreshes - before;
      // One read per 100 ms at most (plus the first, which needs no wait).
      expect(reads).toBeGreaterThanOrEqual(2);
      expect(reads).toBeLessThanOrEqual(Math.ceil(elapsed / 100) + 1);
    } finally {
      jwt.close();
      await storage.close();
    }
  });
});

describe("key schedule configuration", () => {
  const load = (jwt: JwtInput) => loadConfig({ env: {}, overrides: { auth: { jwt } } });

  it("defaults the pre-publication to an hour, at most half the rotation interval", () => {
    expect(keyPrePublicationSeconds(load({}).auth.jwt)).toBe(3600);
    expect(keyPrePublicationSeconds(load({ keyRotationInterval: 600 }).auth.jwt)).toBe(300);
    expect(keyPrePublicationSeconds(load({ keyPrePublication: 0 }).auth.jwt)).toBe(0);
  });

  it("refuses a pre-publication not shorter than the interval or shorter than two refreshes", () => {
    expect(() => load({ keyRotationInterval: 60, keyPrePublication: 60 })).toThrow(/keyPrePublication/);
    expect(() => load({ keyPrePublication: 1, keyRefreshMs: 600 })).toThrow(/twice/);
    expect(
      loadConfig({ env: { TESSERA_JWT_KEY_PRE_PUBLICATION: "7", TESSERA_JWT_KEY_REFRESH_MS: "250" } }).auth
        .jwt,
    ).toMatchObject({ keyPrePublication: 7, keyRefreshMs: 250 });
  });
});
