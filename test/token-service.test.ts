import { randomUUID } from "node:crypto";
import { crc32 } from "node:zlib";
import { toJsonString } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Client, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  ListApiKeysResponseSchema,
  ListPersonalAccessTokensResponseSchema,
  TokenKind,
  TokenService,
} from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { App } from "../src/app.js";
import type { BearerVerifier } from "../src/auth/authenticator.js";
import { generateToken } from "../src/auth/token-format.js";
import { createApiTokenVerifier } from "../src/auth/token-verifier.js";
import type { RequestState } from "../src/context.js";
import { TesseraError } from "../src/errors.js";
import { Tenant } from "../src/storage/entities.js";
import { CredentialRepository } from "../src/storage/repositories/credentials.js";
import type { SqlRunner } from "../src/storage/sql.js";
import { Code, rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestApp,
  DATABASES,
  memoryTransport,
  pinnableClock,
  withHeaders,
} from "./helpers.js";

const PAT_PREFIX = "tsr_pat_";
const KEY_PREFIX = "tsr_key_";
const PASSWORD = "correct horse battery staple";
const STATIC_ADMIN_TOKEN = "static-admin-token-for-token-service-tests";

/** The CRC32/base62 checksum of the token format, to build well-formed tokens by hand. */
function withChecksum(head: string): string {
  const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  let v = crc32(head) >>> 0;
  let out = "";
  do {
    out = alphabet[v % 62] + out;
    v = Math.floor(v / 62);
  } while (v > 0);
  return head + out.padStart(6, "0");
}

/** A SqlRunner that counts the statements asked of it (cached reads included, hit or miss). */
function countingSql(inner: SqlRunner): SqlRunner & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    cachedGet(sql, params) {
      calls.push(sql);
      return inner.cachedGet(sql, params);
    },
    cachedAll(sql, params) {
      calls.push(sql);
      return inner.cachedAll(sql, params);
    },
    cacheStats: () => inner.cacheStats(),
    get(sql, params) {
      calls.push(sql);
      return inner.get(sql, params);
    },
    all(sql, params) {
      calls.push(sql);
      return inner.all(sql, params);
    },
    run(sql, params) {
      calls.push(sql);
      return inner.run(sql, params);
    },
  };
}

const state = (): RequestState => ({
  requestId: "test",
  ip: "127.0.0.1",
  certificate: null,
  principal: null,
});
/** A verifier's refusal reason, whether it throws at once (its row in the state cache) or rejects. */
const reasonOf = async (verify: () => unknown) => {
  try {
    await verify();
  } catch (err) {
    return err instanceof TesseraError ? err.reason : String(err);
  }
  return "accepted";
};

describe.each(DATABASES)("TokenService on $name", (db) => {
  let app: App;
  let adminJwt: string;
  // The machine's time, pinned by the expiry tests to step across an instant.
  const clock = pinnableClock();
  const users = (token?: string) => clientFor(UserService, memoryTransport(app), token);
  const tokens = (token?: string) => clientFor(TokenService, memoryTransport(app), token);
  const withApiKey = <S extends typeof UserService | typeof TokenService>(
    service: S,
    key: string,
  ): Client<S> => createClient(service, withHeaders(memoryTransport(app), { "x-api-key": key }));

  beforeAll(async () => {
    app = await createTestApp(db, { admin: { token: STATIC_ADMIN_TOKEN } }, { clock: clock.now });
    adminJwt = (await users().login({ username: "admin", password: ADMIN_PASSWORD })).accessToken;
  });
  afterAll(async () => {
    await app.close();
  });

  async function createUser(scopes: string[], tenantId?: string) {
    const username = `u-${randomUUID().slice(0, 8)}`;
    const { user } = await users(adminJwt).createUser({
      username,
      password: PASSWORD,
      scopes,
      ...(tenantId ? { tenantId } : {}),
    });
    // Naming the tenant: a username alone reaches only the default tenant's users.
    const login = await users().login({ username, password: PASSWORD, tenant: user!.tenantId });
    return { user: user!, jwt: login.accessToken };
  }

  /** A verifier like the app's, over counting SQL and a counting secret check. */
  function countingVerifier(now?: () => number) {
    const sql = countingSql(app.sql);
    const secretChecks: string[] = [];
    const verifier = createApiTokenVerifier({
      credentials: new CredentialRepository(sql),
      secrets: {
        verify(ns, secret, hash) {
          secretChecks.push(ns);
          return app.secrets.verify(ns, secret, hash);
        },
        knows: (ns, secret, hash) => app.secrets.knows(ns, secret, hash),
      },
      lastUsed: app.lastUsed,
      patPrefix: PAT_PREFIX,
      apiKeyPrefix: KEY_PREFIX,
      ...(now ? { now } : {}),
    });
    return { verifier, sql, secretChecks };
  }

  /** Run `fn` with the app's token verifier replaced (so the whole interceptor chain uses it). */
  async function withVerifier<T>(verifier: BearerVerifier, fn: () => Promise<T>): Promise<T> {
    const list = app.authenticator.bearer;
    const index = list.findIndex((v) => v.name === "api-token");
    expect(index).toBeGreaterThanOrEqual(0);
    const original = list[index]!;
    list[index] = verifier;
    try {
      return await fn();
    } finally {
      list[index] = original;
    }
  }

  describe("create and use", () => {
    it("creates a personal access token that authenticates as Bearer and as X-API-Key", async () => {
      const { user, jwt } = await createUser(["cluster:read", "swarm:deploy"]);
      const created = await tokens(jwt).createPersonalAccessToken({ name: "CLI Access" });
      expect(created.token).toMatch(/^tsr_pat_[0-9A-Za-z]{54}$/);
      expect(created.id).toMatch(/^[0-9a-f-]{36}$/);
      expect(created.name).toBe("CLI Access");
      expect(created.ownerUserId).toBe(user.id);
      expect(created.hint).toBe(`tsr_pat_…${created.token.slice(-4)}`);
      expect(created.scopes).toEqual(["cluster:read", "swarm:deploy"]);
      expect(created.createdAt).toBeDefined();
      expect(created.expiresAt).toBeUndefined();

      const viaBearer = await users(created.token).getCurrentUser({});
      expect(viaBearer.id).toBe(user.id);
      expect([...viaBearer.permissions].sort()).toEqual(["cluster:read", "swarm:deploy"]);
      const viaHeader = await withApiKey(UserService, created.token).getCurrentUser({});
      expect(viaHeader.id).toBe(user.id);
    });

    it("creates an API key with the seed's response shape that authenticates as X-API-Key and as Bearer", async () => {
      const { user, jwt } = await createUser(["cluster:read"]);
      const expiresAt = timestampFromMs(Date.now() + 3_600_000);
      const created = await tokens(jwt).createApiKey({ name: "CI/CD Integration", expiresAt });
      expect(created.key).toMatch(/^tsr_key_[0-9A-Za-z]{54}$/);
      expect(created.name).toBe("CI/CD Integration");
      expect(created.createdAt).toBeDefined();
      expect(timestampDate(created.expiresAt!).getTime()).toBe(timestampDate(expiresAt).getTime());
      expect((await withApiKey(UserService, created.key).getCurrentUser({})).id).toBe(user.id);
      expect((await users(created.key).getCurrentUser({})).id).toBe(user.id);
    });

    it("requires a name of 1 to 100 characters", async () => {
      const { jwt } = await createUser([]);
      for (const name of ["", "   ", "x".repeat(101), "tab\there"]) {
        const r = await rejection(tokens(jwt).createPersonalAccessToken({ name }));
        expect(r.code).toBe(Code.InvalidArgument);
        expect(r.reason).toBe("INVALID_ARGUMENT");
      }
      expect((await tokens(jwt).createApiKey({ name: "x".repeat(100) })).name).toHaveLength(100);
    });

    it("refuses an expiry that is not in the future", async () => {
      const { jwt } = await createUser([]);
      const r = await rejection(
        tokens(jwt).createPersonalAccessToken({
          name: "past",
          expiresAt: timestampFromMs(Date.now() - 1000),
        }),
      );
      expect(r.code).toBe(Code.InvalidArgument);
      expect(r.reason).toBe("INVALID_ARGUMENT");
      const k = await rejection(
        tokens(jwt).createApiKey({ name: "now", expiresAt: timestampFromDate(new Date()) }),
      );
      expect(k.code).toBe(Code.InvalidArgument);
    });

    it("refuses an expiry past google.protobuf.Timestamp's range, and keeps one at its end usable", async () => {
      const { jwt } = await createUser([]);
      // Year 10000: the database stores it, and it came back in a form no reader took.
      const r = await rejection(
        tokens(jwt).createPersonalAccessToken({
          name: "far",
          expiresAt: { seconds: 253_402_300_800n, nanos: 0 },
        }),
      );
      expect(r.code).toBe(Code.InvalidArgument);
      const last = await tokens(jwt).createPersonalAccessToken({
        name: "last second",
        expiresAt: { seconds: 253_402_300_799n, nanos: 0 },
      });
      expect(await tokens(last.token).listPersonalAccessTokens({})).toBeDefined();
    });

    it("refuses a token with a malformed shape as TOKEN_INVALID without echoing it", async () => {
      const bad = "tsr_pat_this-is-not-a-token";
      const r = await rejection(users(bad).getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_INVALID");
      expect(r.message).not.toContain(bad);
      expect(r.error.metadata.get("www-authenticate")).toContain('error="invalid_token"');
    });

    it("refuses two credentials in one request with InvalidArgument", async () => {
      const { jwt } = await createUser([]);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "two" });
      const both = createClient(
        UserService,
        withHeaders(memoryTransport(app), { authorization: `Bearer ${jwt}`, "x-api-key": token }),
      );
      const r = await rejection(both.getCurrentUser({}));
      expect(r.code).toBe(Code.InvalidArgument);
      expect(r.reason).toBe("MULTIPLE_CREDENTIALS");
    });
  });

  describe("scopes", () => {
    it("gives a token the owner's scopes when none are asked for, and a subset when asked", async () => {
      const { jwt } = await createUser(["cluster:read", "cluster:write", "swarm:deploy"]);
      const all = await tokens(jwt).createPersonalAccessToken({ name: "all" });
      expect(all.scopes).toEqual(["cluster:read", "cluster:write", "swarm:deploy"]);
      const some = await tokens(jwt).createApiKey({ name: "some", scopes: ["cluster:read"] });
      expect(some.scopes).toEqual(["cluster:read"]);
      expect((await users(some.key).getCurrentUser({})).permissions).toEqual(["cluster:read"]);
    });

    it("refuses scopes the owner does not hold with PermissionDenied and invalid scopes with InvalidArgument", async () => {
      const { jwt } = await createUser(["cluster:read"]);
      const more = await rejection(
        tokens(jwt).createPersonalAccessToken({ name: "more", scopes: ["cluster:read", "cluster:write"] }),
      );
      expect(more.code).toBe(Code.PermissionDenied);
      expect(more.reason).toBe("ACCESS_DENIED");
      const star = await rejection(tokens(jwt).createApiKey({ name: "star", scopes: ["*"] }));
      expect(star.reason).toBe("ACCESS_DENIED");
      const invalid = await rejection(tokens(jwt).createApiKey({ name: "bad", scopes: ["Not A Scope"] }));
      expect(invalid.code).toBe(Code.InvalidArgument);
    });

    it("lets a token create tokens only within its own scopes", async () => {
      const { jwt } = await createUser(["cluster:read", "swarm:deploy"]);
      const narrow = await tokens(jwt).createPersonalAccessToken({
        name: "narrow",
        scopes: ["cluster:read"],
      });
      const child = await tokens(narrow.token).createApiKey({ name: "child" });
      expect(child.scopes).toEqual(["cluster:read"]);
      const r = await rejection(
        tokens(narrow.token).createApiKey({ name: "wider", scopes: ["swarm:deploy"] }),
      );
      expect(r.code).toBe(Code.PermissionDenied);
      expect(r.reason).toBe("ACCESS_DENIED");
    });

    it("takes a scope away from the token on the next request when the owner loses it, and gives it back", async () => {
      const { user, jwt } = await createUser(["cluster:read", "admin:users"]);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "scoped" });
      expect((await users(token).listUsers({})).users.length).toBeGreaterThan(0);

      await users(adminJwt).updateUser({ id: user.id, scopes: { scopes: ["cluster:read"] } });
      expect((await users(token).getCurrentUser({})).permissions).toEqual(["cluster:read"]);
      const denied = await rejection(users(token).listUsers({}));
      expect(denied.code).toBe(Code.PermissionDenied);
      expect(denied.reason).toBe("ACCESS_DENIED");

      await users(adminJwt).updateUser({ id: user.id, scopes: { scopes: ["cluster:read", "admin:users"] } });
      expect([...(await users(token).getCurrentUser({})).permissions].sort()).toEqual([
        "admin:users",
        "cluster:read",
      ]);
    });
  });

  describe("owner state", () => {
    it("refuses the tokens of a disabled owner and accepts them again once re-enabled", async () => {
      const { user, jwt } = await createUser(["cluster:read"]);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "pat" });
      const { key } = await tokens(jwt).createApiKey({ name: "key" });
      expect((await users(token).getCurrentUser({})).id).toBe(user.id);

      await users(adminJwt).updateUser({ id: user.id, disabled: true });
      for (const t of [token, key]) {
        const r = await rejection(users(t).getCurrentUser({}));
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe("PRINCIPAL_DISABLED");
      }
      await users(adminJwt).updateUser({ id: user.id, disabled: false });
      expect((await users(token).getCurrentUser({})).id).toBe(user.id);
      expect((await withApiKey(UserService, key).getCurrentUser({})).id).toBe(user.id);
    });

    it("refuses the tokens of a disabled tenant", async () => {
      const em = app.storage.em.fork();
      const tenant = em.create(Tenant, {
        id: randomUUID(),
        name: `t-${randomUUID().slice(0, 8)}`,
        disabled: false,
        createdAt: new Date(),
        updatedAt: new Date(),
      });
      await em.flush();
      const { jwt } = await createUser(["cluster:read"], tenant.id);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "pat" });
      await users(token).getCurrentUser({});
      tenant.disabled = true;
      await em.flush();
      const r = await rejection(users(token).getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("PRINCIPAL_DISABLED");
    });

    it("refuses the tokens of a deleted owner", async () => {
      const { user, jwt } = await createUser(["cluster:read"]);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "pat" });
      await users(token).getCurrentUser({});
      await users(adminJwt).deleteUser({ id: user.id });
      const r = await rejection(users(token).getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_INVALID");
      // The owner's tokens went with it (ON DELETE CASCADE).
      expect(await app.sql.all("select id from api_tokens where owner_user_id = ?", [user.id])).toEqual([]);
    });
  });

  describe("list and revoke", () => {
    it("lists tokens with their hint and metadata but never the secret or its hash", async () => {
      const { user, jwt } = await createUser(["cluster:read"]);
      const pat = await tokens(jwt).createPersonalAccessToken({
        name: "listed",
        expiresAt: timestampFromMs(Date.now() + 86_400_000),
      });
      const key = await tokens(jwt).createApiKey({ name: "listed key" });

      const pats = await tokens(jwt).listPersonalAccessTokens({});
      expect(pats.tokens.map((t) => t.id)).toEqual([pat.id]);
      const [meta] = pats.tokens;
      expect(meta!.kind).toBe(TokenKind.PERSONAL_ACCESS_TOKEN);
      expect(meta!.name).toBe("listed");
      expect(meta!.hint).toBe(`${PAT_PREFIX}…${pat.token.slice(-4)}`);
      expect(meta!.scopes).toEqual(["cluster:read"]);
      expect(meta!.ownerUserId).toBe(user.id);
      expect(meta!.tenantId).toBe(user.tenantId);
      expect(meta!.createdAt).toBeDefined();
      expect(meta!.expiresAt).toBeDefined();
      expect(meta!.revoked).toBe(false);
      expect(pats.totalSize).toBe(1);

      const keys = await tokens(jwt).listApiKeys({});
      expect(keys.apiKeys.map((k) => k.id)).toEqual([key.id]);
      expect(keys.apiKeys[0]!.kind).toBe(TokenKind.API_KEY);

      const json =
        toJsonString(ListPersonalAccessTokensResponseSchema, pats) +
        toJsonString(ListApiKeysResponseSchema, keys);
      for (const secret of [
        pat.token,
        key.key,
        pat.token.slice(PAT_PREFIX.length + 16, PAT_PREFIX.length + 48),
      ]) {
        expect(json).not.toContain(secret);
      }
      expect(json).not.toContain("pbkdf2");
    });

    it("pages through a caller's tokens", async () => {
      const { jwt } = await createUser([]);
      for (const name of ["a", "b", "c"]) await tokens(jwt).createPersonalAccessToken({ name });
      const first = await tokens(jwt).listPersonalAccessTokens({ pageSize: 2 });
      expect(first.tokens).toHaveLength(2);
      expect(first.totalSize).toBe(3);
      const second = await tokens(jwt).listPersonalAccessTokens({
        pageSize: 2,
        pageToken: first.nextPageToken,
      });
      expect(second.tokens).toHaveLength(1);
      expect(second.nextPageToken).toBe("");
      expect(new Set([...first.tokens, ...second.tokens].map((t) => t.name))).toEqual(
        new Set(["a", "b", "c"]),
      );
    });

    it("revokes a token so that the very next request is refused with TOKEN_REVOKED", async () => {
      const { jwt } = await createUser(["cluster:read"]);
      const pat = await tokens(jwt).createPersonalAccessToken({ name: "to revoke" });
      // Used twice: the second use is served from the verified-secret cache.
      await users(pat.token).getCurrentUser({});
      await users(pat.token).getCurrentUser({});

      const revoked = await tokens(jwt).revokePersonalAccessToken({ id: pat.id });
      expect(revoked.token?.revoked).toBe(true);
      expect(revoked.token?.revokedAt).toBeDefined();
      for (const client of [users(pat.token), withApiKey(UserService, pat.token)]) {
        const r = await rejection(client.getCurrentUser({}));
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe("TOKEN_REVOKED");
        expect(r.message).not.toContain(pat.token);
      }

      // Idempotent: revoking again succeeds and keeps the first revocation time.
      const again = await tokens(jwt).revokePersonalAccessToken({ id: pat.id });
      expect(again.token?.revokedAt).toEqual(revoked.token?.revokedAt);
      // Left out of the list unless asked for.
      expect((await tokens(jwt).listPersonalAccessTokens({})).tokens).toEqual([]);
      const withRevoked = await tokens(jwt).listPersonalAccessTokens({ includeRevoked: true });
      expect(withRevoked.tokens.map((t) => [t.id, t.revoked])).toEqual([[pat.id, true]]);
    });

    it("revokes an API key with RevokeApiKey, and treats ids of the other kind as NotFound", async () => {
      const { jwt } = await createUser([]);
      const pat = await tokens(jwt).createPersonalAccessToken({ name: "pat" });
      const key = await tokens(jwt).createApiKey({ name: "key" });
      expect((await rejection(tokens(jwt).revokeApiKey({ id: pat.id }))).code).toBe(Code.NotFound);
      expect((await rejection(tokens(jwt).revokePersonalAccessToken({ id: key.id }))).code).toBe(
        Code.NotFound,
      );
      expect((await rejection(tokens(jwt).revokeApiKey({ id: randomUUID() }))).code).toBe(Code.NotFound);
      expect((await rejection(tokens(jwt).revokeApiKey({ id: "not-a-uuid" }))).code).toBe(Code.NotFound);
      expect((await tokens(jwt).revokeApiKey({ id: key.id })).apiKey?.revoked).toBe(true);
      expect((await rejection(withApiKey(UserService, key.key).getCurrentUser({}))).reason).toBe(
        "TOKEN_REVOKED",
      );
      // The PAT is untouched.
      await users(pat.token).getCurrentUser({});
    });

    it("lets a token revoke itself", async () => {
      const { jwt } = await createUser([]);
      const pat = await tokens(jwt).createPersonalAccessToken({ name: "self" });
      await tokens(pat.token).revokePersonalAccessToken({ id: pat.id });
      expect((await rejection(tokens(pat.token).listPersonalAccessTokens({}))).reason).toBe("TOKEN_REVOKED");
    });

    it("lets admin:tokens list and revoke another user's tokens in its tenant", async () => {
      const owner = await createUser(["cluster:read"]);
      // Revoking needs authority over the owner as well (assertMayManage): its scopes too.
      const admin = await createUser(["admin:tokens", "cluster:read"]);
      const pat = await tokens(owner.jwt).createPersonalAccessToken({ name: "owned" });
      const key = await tokens(owner.jwt).createApiKey({ name: "owned key" });

      const listed = await tokens(admin.jwt).listPersonalAccessTokens({ userId: owner.user.id });
      expect(listed.tokens.map((t) => t.id)).toEqual([pat.id]);
      const everyone = await tokens(admin.jwt).listApiKeys({ allUsers: true });
      expect(everyone.apiKeys.map((k) => k.id)).toContain(key.id);
      expect(everyone.apiKeys.every((k) => k.tenantId === admin.user.tenantId)).toBe(true);

      await tokens(admin.jwt).revokePersonalAccessToken({ id: pat.id });
      await tokens(admin.jwt).revokeApiKey({ id: key.id });
      expect((await rejection(users(pat.token).getCurrentUser({}))).reason).toBe("TOKEN_REVOKED");
      expect((await rejection(users(key.key).getCurrentUser({}))).reason).toBe("TOKEN_REVOKED");
    });

    it("hides another tenant's tokens from admin:tokens as NotFound", async () => {
      const em = app.storage.em.fork();
      const other = em.create(Tenant, {
        id: randomUUID(),
        name: `o-${randomUUID().slice(0, 8)}`,
        disabled: false,
        createdAt: new Date(),
        updatedAt: new Date(),
      });
      await em.flush();
      const foreign = await createUser(["cluster:read"], other.id);
      const pat = await tokens(foreign.jwt).createPersonalAccessToken({ name: "foreign" });
      const key = await tokens(foreign.jwt).createApiKey({ name: "foreign key" });
      const admin = await createUser(["admin:tokens"]);

      const list = await rejection(tokens(admin.jwt).listPersonalAccessTokens({ userId: foreign.user.id }));
      expect(list.code).toBe(Code.NotFound);
      expect(
        (await tokens(admin.jwt).listApiKeys({ allUsers: true })).apiKeys.map((k) => k.id),
      ).not.toContain(key.id);
      expect((await rejection(tokens(admin.jwt).revokePersonalAccessToken({ id: pat.id }))).code).toBe(
        Code.NotFound,
      );
      expect((await rejection(tokens(admin.jwt).revokeApiKey({ id: key.id }))).code).toBe(Code.NotFound);
      await users(pat.token).getCurrentUser({});
    });

    it("does not let a user without admin:tokens see or revoke another user's tokens", async () => {
      const owner = await createUser(["cluster:read"]);
      const other = await createUser(["cluster:read", "admin:users"]);
      const pat = await tokens(owner.jwt).createPersonalAccessToken({ name: "mine" });

      const list = await rejection(tokens(other.jwt).listPersonalAccessTokens({ userId: owner.user.id }));
      expect(list.code).toBe(Code.PermissionDenied);
      expect(list.reason).toBe("ACCESS_DENIED");
      const all = await rejection(tokens(other.jwt).listApiKeys({ allUsers: true }));
      expect(all.reason).toBe("ACCESS_DENIED");
      const revoke = await rejection(tokens(other.jwt).revokePersonalAccessToken({ id: pat.id }));
      expect(revoke.code).toBe(Code.NotFound);
      expect((await tokens(other.jwt).listPersonalAccessTokens({})).tokens).toEqual([]);
      await users(pat.token).getCurrentUser({});
    });

    it("lets the static admin token list and revoke any user's tokens, but not own one", async () => {
      const owner = await createUser(["cluster:read"]);
      const key = await tokens(owner.jwt).createApiKey({ name: "watched" });
      const admin = tokens(STATIC_ADMIN_TOKEN);

      const created = await rejection(admin.createApiKey({ name: "ownerless" }));
      expect(created.code).toBe(Code.PermissionDenied);
      expect(created.reason).toBe("PRINCIPAL_NOT_ALLOWED");
      const own = await rejection(admin.listApiKeys({}));
      expect(own.code).toBe(Code.InvalidArgument);

      expect((await admin.listApiKeys({ userId: owner.user.id })).apiKeys.map((k) => k.id)).toEqual([key.id]);
      expect((await admin.listApiKeys({ allUsers: true })).apiKeys.map((k) => k.id)).toContain(key.id);
      expect((await admin.revokeApiKey({ id: key.id })).apiKey?.revoked).toBe(true);
      expect((await rejection(users(key.key).getCurrentUser({}))).reason).toBe("TOKEN_REVOKED");
    });

    it("writes last_used_at in a batch, not on the request", async () => {
      const { jwt } = await createUser([]);
      const pat = await tokens(jwt).createPersonalAccessToken({ name: "used" });
      expect((await tokens(jwt).listPersonalAccessTokens({})).tokens[0]!.lastUsedAt).toBeUndefined();
      const before = Date.now();
      await users(pat.token).getCurrentUser({});
      await app.lastUsed.flush();
      const [meta] = (await tokens(jwt).listPersonalAccessTokens({})).tokens;
      expect(meta!.lastUsedAt).toBeDefined();
      expect(timestampDate(meta!.lastUsedAt!).getTime()).toBeGreaterThanOrEqual(before - 1000);
    });
  });

  describe("expiry", () => {
    it("accepts a token until its expiry and refuses it from then on with TOKEN_EXPIRED", async () => {
      const { jwt } = await createUser([]);
      const expiresAt = Date.now() + 3_600_000;
      const pat = await tokens(jwt).createPersonalAccessToken({
        name: "short",
        expiresAt: timestampFromMs(expiresAt),
      });
      await users(pat.token).getCurrentUser({});
      try {
        // Through the whole interceptor chain, the verified-secret cache warm.
        clock.pin(expiresAt - 1);
        await users(pat.token).getCurrentUser({});
        clock.pin(expiresAt);
        const r = await rejection(users(pat.token).getCurrentUser({}));
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe("TOKEN_EXPIRED");
      } finally {
        clock.release();
      }
    });

    it("refuses to create a token whose expiry is not after the app's now", async () => {
      const { jwt } = await createUser([]);
      // Within the caller's JWT lifetime: the pinned clock must still accept it.
      const expiresAt = Date.now() + 60_000;
      try {
        clock.pin(expiresAt);
        const r = await rejection(
          tokens(jwt).createApiKey({ name: "late", expiresAt: timestampFromMs(expiresAt) }),
        );
        expect(r.code).toBe(Code.InvalidArgument);
        clock.pin(expiresAt - 1);
        const key = await tokens(jwt).createApiKey({
          name: "in time",
          expiresAt: timestampFromMs(expiresAt),
        });
        expect(timestampDate(key.createdAt!).getTime()).toBe(expiresAt - 1);
      } finally {
        clock.release();
      }
    });

    it("treats the exact expiry instant as expired", async () => {
      const { jwt } = await createUser([]);
      const expiresAt = Date.now() + 3_600_000;
      const key = await tokens(jwt).createApiKey({ name: "boundary", expiresAt: timestampFromMs(expiresAt) });
      const justBefore = countingVerifier(() => expiresAt - 1);
      expect((await justBefore.verifier.verify(key.key, state()))?.credentialId).toBe(key.id);
      const atExpiry = countingVerifier(() => expiresAt);
      expect(await reasonOf(() => atExpiry.verifier.verify(key.key, state()))).toBe("TOKEN_EXPIRED");
      expect(atExpiry.secretChecks).toEqual([]);
    });
  });

  describe("verification cost", () => {
    it("rejects a token with a typo by its checksum, without a database query or PBKDF2", async () => {
      const { jwt } = await createUser([]);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "typo" });
      const at = PAT_PREFIX.length + 20;
      const typo = token.slice(0, at) + (token[at] === "a" ? "b" : "a") + token.slice(at + 1);
      const counting = countingVerifier();
      await withVerifier(counting.verifier, async () => {
        for (const client of [users(typo), withApiKey(UserService, typo)]) {
          const r = await rejection(client.getCurrentUser({}));
          expect(r.code).toBe(Code.Unauthenticated);
          expect(r.reason).toBe("TOKEN_INVALID");
          expect(r.message).not.toContain(typo);
        }
        // The same interceptor chain does reach the database for the real token.
        await users(token).getCurrentUser({});
      });
      expect(counting.sql.calls).toHaveLength(1);
      expect(counting.secretChecks).toHaveLength(1);
    });

    it("rejects a well-formed token of unknown id after one indexed query and no PBKDF2", async () => {
      const counting = countingVerifier();
      const unknown = generateToken(KEY_PREFIX).token;
      await withVerifier(counting.verifier, async () => {
        const r = await rejection(withApiKey(UserService, unknown).getCurrentUser({}));
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe("TOKEN_INVALID");
      });
      expect(counting.sql.calls).toHaveLength(1);
      expect(counting.sql.calls[0]).toContain("where k.public_id = ?");
      expect(counting.secretChecks).toEqual([]);
    });

    it("refuses a personal access token's id presented with the API-key prefix, before PBKDF2", async () => {
      const { jwt } = await createUser([]);
      const { token } = await tokens(jwt).createPersonalAccessToken({ name: "kind" });
      const body = token.slice(PAT_PREFIX.length, -6);
      const confused = withChecksum(KEY_PREFIX + body);
      const counting = countingVerifier();
      expect(await reasonOf(() => counting.verifier.verify(confused, state()))).toBe("TOKEN_INVALID");
      expect(counting.secretChecks).toEqual([]);
      // And the genuine token still verifies.
      expect((await counting.verifier.verify(token, state()))?.method).toBe("pat");
    });

    it("refuses a known id with a wrong secret as TOKEN_INVALID", async () => {
      const { jwt } = await createUser([]);
      const { key: token } = await tokens(jwt).createApiKey({ name: "wrong secret" });
      const id = token.slice(KEY_PREFIX.length, KEY_PREFIX.length + 16);
      const forged = withChecksum(KEY_PREFIX + id + generateToken(KEY_PREFIX).secret);
      const r = await rejection(users(forged).getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_INVALID");
    });

    it("checks a revoked or disabled owner's token without reaching PBKDF2", async () => {
      const { user, jwt } = await createUser([]);
      const pat = await tokens(jwt).createPersonalAccessToken({ name: "cheap refusals" });
      const counting = countingVerifier();
      await users(adminJwt).updateUser({ id: user.id, disabled: true });
      expect(await reasonOf(() => counting.verifier.verify(pat.token, state()))).toBe("PRINCIPAL_DISABLED");
      await users(adminJwt).updateUser({ id: user.id, disabled: false });
      await tokens(adminJwt).revokePersonalAccessToken({ id: pat.id });
      expect(await reasonOf(() => counting.verifier.verify(pat.token, state()))).toBe("TOKEN_REVOKED");
      expect(counting.secretChecks).toEqual([]);
    });

    it("leaves tokens with other prefixes to other verifiers", async () => {
      const counting = countingVerifier();
      expect(await counting.verifier.verify("eyJhbGciOiJFZERTQSJ9.e30.sig", state())).toBeNull();
      expect(await counting.verifier.verify(generateToken("tsr_mu_").token, state())).toBeNull();
      expect(counting.sql.calls).toEqual([]);
    });

    it("marks the principal with the token's kind and id", async () => {
      const { user, jwt } = await createUser(["cluster:read"]);
      const key = await tokens(jwt).createApiKey({ name: "principal" });
      const p = await countingVerifier().verifier.verify(key.key, state());
      expect(p).toMatchObject({
        kind: "user",
        method: "api_key",
        id: user.id,
        tenantId: user.tenantId,
        credentialId: key.id,
        scopes: ["cluster:read"],
      });
    });
  });

  describe("at rest", () => {
    it("stores only a salted PBKDF2 hash of the secret, with its parameters", async () => {
      const { jwt } = await createUser([]);
      const a = await tokens(jwt).createPersonalAccessToken({ name: "a" });
      const b = await tokens(jwt).createApiKey({ name: "b" });
      const rows = await app.sql.all<Record<string, unknown>>("select * from api_tokens where id in (?, ?)", [
        a.id,
        b.id,
      ]);
      expect(rows).toHaveLength(2);
      const hashes = rows.map((r) => String(r.secret_hash));
      for (const h of hashes) expect(h).toMatch(/^pbkdf2-sha256\$1000\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$/);
      // A salt per token.
      expect(hashes[0]!.split("$")[2]).not.toBe(hashes[1]!.split("$")[2]);
      const dump = JSON.stringify(rows);
      for (const token of [a.token, b.key]) {
        expect(dump).not.toContain(token);
        expect(dump).not.toContain(token.slice(-38, -6)); // the secret part
      }
    });
  });
});

describe.each(DATABASES)("TokenService default hashing on $name", (db) => {
  it("hashes token secrets with PBKDF2-SHA256 at 600,000 iterations by default", async () => {
    const app = await createTestApp(db, { auth: { passwordIterations: 600_000 } });
    try {
      const login = await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const created = await clientFor(
        TokenService,
        memoryTransport(app),
        login.accessToken,
      ).createPersonalAccessToken({ name: "default" });
      const row = await app.sql.get<{ secret_hash: string }>(
        "select secret_hash from api_tokens where id = ?",
        [created.id],
      );
      expect(row?.secret_hash.startsWith("pbkdf2-sha256$600000$")).toBe(true);
      expect(
        (await clientFor(UserService, memoryTransport(app), created.token).getCurrentUser({})).username,
      ).toBe("admin");
    } finally {
      await app.close();
    }
  });
});
