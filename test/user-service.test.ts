import { randomUUID } from "node:crypto";
import { SignJWT } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { App } from "../src/app.js";
import { Tenant } from "../src/storage/entities.js";
import { Code, rejection } from "./errors-util.js";
import { ADMIN_PASSWORD, clientFor, createTestApp, DATABASES, memoryTransport } from "./helpers.js";

const SECRET = "an-hs256-secret-that-is-long-enough-for-tests";

describe.each(DATABASES)("UserService on $name", (db) => {
  let app: App;
  let adminToken: string;
  const anon = () => clientFor(UserService, memoryTransport(app));
  const as = (token: string) => clientFor(UserService, memoryTransport(app), token);

  beforeAll(async () => {
    app = await createTestApp(db, { auth: { jwt: { secret: SECRET } } });
    adminToken = (await anon().login({ username: "admin", password: ADMIN_PASSWORD })).accessToken;
  });
  afterAll(async () => {
    await app.close();
  });

  async function createUser(scopes: string[], username = `u-${randomUUID().slice(0, 8)}`) {
    const { user } = await as(adminToken).createUser({ username, password: "correct horse battery", scopes });
    const login = await anon().login({ username, password: "correct horse battery" });
    return { user: user!, token: login.accessToken, refresh: login.refreshToken };
  }

  it("logs in the bootstrap admin and returns its user with the * scope", async () => {
    const res = await anon().login({ username: "admin", password: ADMIN_PASSWORD });
    expect(res.accessToken.split(".")).toHaveLength(3);
    expect(res.refreshToken).toMatch(/^tsr_rt_/);
    expect(res.tokenType).toBe("Bearer");
    expect(res.user?.username).toBe("admin");
    expect(res.user?.permissions).toEqual(["*"]);
    expect(Number(res.accessTokenExpiresAt!.seconds) * 1000).toBeGreaterThan(Date.now());
  });

  it("gives one generic message for a wrong password and for an unknown user", async () => {
    const wrong = await rejection(anon().login({ username: "admin", password: "not-the-password" }));
    const unknown = await rejection(anon().login({ username: "nobody-here", password: "not-the-password" }));
    expect(wrong.code).toBe(Code.Unauthenticated);
    expect(wrong.reason).toBe("CREDENTIALS_INVALID");
    expect(unknown.code).toBe(Code.Unauthenticated);
    expect(unknown.reason).toBe(wrong.reason);
    expect(unknown.message).toBe(wrong.message);
  });

  it("returns the current user with its scopes as permissions", async () => {
    const { user, token } = await createUser(["cluster:read", "swarm:deploy"]);
    const me = await as(token).getCurrentUser({});
    expect(me.id).toBe(user.id);
    expect(me.username).toBe(user.username);
    expect(me.tenantId).toBe(user.tenantId);
    expect([...me.permissions].sort()).toEqual(["cluster:read", "swarm:deploy"]);
    expect(me.createdAt).toBeDefined();
  });

  it("rejects a call without a credential as AUTH_REQUIRED", async () => {
    const r = await rejection(anon().getCurrentUser({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("AUTH_REQUIRED");
    expect(r.error.metadata.get("www-authenticate")).toBe('Bearer realm="tessera"');
  });

  it("rejects a tampered token as TOKEN_INVALID with an invalid_token challenge", async () => {
    const [h, p, s] = adminToken.split(".");
    const tampered = `${h}.${p}.${s!.slice(0, -2)}${s!.endsWith("AA") ? "BB" : "AA"}`;
    const r = await rejection(as(tampered).getCurrentUser({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("TOKEN_INVALID");
    expect(r.error.metadata.get("www-authenticate")).toContain('error="invalid_token"');
    expect(r.message).not.toContain(tampered);
  });

  it("rejects an expired token as TOKEN_EXPIRED", async () => {
    const me = await as(adminToken).getCurrentUser({});
    const past = Math.floor(Date.now() / 1000) - 3600;
    const expired = await new SignJWT({ tid: me.tenantId, scope: "*", pk: "user" })
      .setProtectedHeader({ alg: "HS256", kid: "hs256", typ: "at+jwt" })
      .setIssuer("tessera")
      .setAudience("tessera")
      .setSubject(me.id)
      .setIssuedAt(past - 900)
      .setExpirationTime(past)
      .sign(new TextEncoder().encode(SECRET));
    const r = await rejection(as(expired).getCurrentUser({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("TOKEN_EXPIRED");
  });

  it("refuses a validly signed JWT whose typ is not an access token", async () => {
    const me = await as(adminToken).getCurrentUser({});
    const now = Math.floor(Date.now() / 1000);
    const refreshTyped = await new SignJWT({ tid: me.tenantId, scope: "*", pk: "user" })
      .setProtectedHeader({ alg: "HS256", kid: "hs256", typ: "refresh+jwt" })
      .setIssuer("tessera")
      .setAudience("tessera")
      .setSubject(me.id)
      .setIssuedAt(now)
      .setExpirationTime(now + 600)
      .sign(new TextEncoder().encode(SECRET));
    const r = await rejection(as(refreshTyped).getCurrentUser({}));
    expect(r.reason).toBe("TOKEN_INVALID");
  });

  it("refuses a token signed with an algorithm outside the allowlist", async () => {
    const me = await as(adminToken).getCurrentUser({});
    const now = Math.floor(Date.now() / 1000);
    const hs512 = await new SignJWT({ tid: me.tenantId, scope: "*", pk: "user" })
      .setProtectedHeader({ alg: "HS512", typ: "at+jwt" })
      .setIssuer("tessera")
      .setAudience("tessera")
      .setSubject(me.id)
      .setIssuedAt(now)
      .setExpirationTime(now + 600)
      .sign(new TextEncoder().encode(`${SECRET}${SECRET}`));
    expect((await rejection(as(hs512).getCurrentUser({}))).reason).toBe("TOKEN_INVALID");
  });

  it("denies an admin RPC to a user without the admin scope", async () => {
    const { token } = await createUser(["cluster:read"]);
    const r = await rejection(as(token).listUsers({}));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.reason).toBe("ACCESS_DENIED");
    expect(r.error.metadata.get("www-authenticate")).toContain('error="insufficient_scope"');
    expect(r.error.metadata.get("www-authenticate")).toContain('scope="admin:users"');
  });

  it("grants admin RPCs through admin:* and through admin:users", async () => {
    const wildcard = await createUser(["admin:*"]);
    const exact = await createUser(["admin:users"]);
    await expect(as(wildcard.token).listUsers({})).resolves.toBeDefined();
    await expect(as(exact.token).listUsers({})).resolves.toBeDefined();
  });

  it("refuses to grant scopes the caller does not hold", async () => {
    const { token } = await createUser(["admin:users", "cluster:read"]);
    const r = await rejection(
      as(token).createUser({
        username: `x-${randomUUID().slice(0, 6)}`,
        password: "long enough password",
        scopes: ["swarm:deploy"],
      }),
    );
    expect(r.code).toBe(Code.PermissionDenied);
    const ok = await as(token).createUser({
      username: `y-${randomUUID().slice(0, 6)}`,
      password: "long enough password",
      scopes: ["cluster:read"],
    });
    expect(ok.user?.permissions).toEqual(["cluster:read"]);
  });

  it("validates usernames, passwords and scopes with InvalidArgument", async () => {
    const c = as(adminToken);
    expect((await rejection(c.createUser({ username: "a", password: "long enough password" }))).code).toBe(
      Code.InvalidArgument,
    );
    expect((await rejection(c.createUser({ username: "valid-name", password: "short" }))).code).toBe(
      Code.InvalidArgument,
    );
    expect(
      (
        await rejection(
          c.createUser({ username: "valid-name", password: "long enough password", scopes: ["BAD SCOPE"] }),
        )
      ).code,
    ).toBe(Code.InvalidArgument);
  });

  it("refuses a duplicate username with AlreadyExists", async () => {
    const { user } = await createUser([]);
    const r = await rejection(
      as(adminToken).createUser({ username: user.username, password: "long enough password" }),
    );
    expect(r.code).toBe(Code.AlreadyExists);
  });

  it("rotates refresh tokens and revokes the family when a spent one is reused", async () => {
    const { refresh } = await createUser([]);
    const first = await anon().refreshToken({ refreshToken: refresh });
    expect(first.refreshToken).not.toBe(refresh);
    const second = await anon().refreshToken({ refreshToken: first.refreshToken });
    // Re-using the spent `refresh` revokes the whole family, including `second`.
    const reuse = await rejection(anon().refreshToken({ refreshToken: refresh }));
    expect(reuse.reason).toBe("TOKEN_REVOKED");
    const after = await rejection(anon().refreshToken({ refreshToken: second.refreshToken }));
    expect(after.reason).toBe("TOKEN_REVOKED");
  });

  it("revokes the refresh family on logout", async () => {
    const { refresh } = await createUser([]);
    await anon().logout({ refreshToken: refresh });
    expect((await rejection(anon().refreshToken({ refreshToken: refresh }))).reason).toBe("TOKEN_REVOKED");
  });

  it("rejects an unknown refresh token as TOKEN_INVALID", async () => {
    expect((await rejection(anon().refreshToken({ refreshToken: "tsr_rt_nope" }))).reason).toBe(
      "TOKEN_INVALID",
    );
  });

  it("stops a disabled user's access token on the next request, and re-enabling does not revive its session", async () => {
    const { user, token } = await createUser(["cluster:read"]);
    await as(token).getCurrentUser({});
    await as(adminToken).updateUser({ id: user.id, disabled: true });
    expect((await rejection(as(token).getCurrentUser({}))).reason).toBe("PRINCIPAL_DISABLED");
    await as(adminToken).updateUser({ id: user.id, disabled: false });
    expect((await rejection(as(token).getCurrentUser({}))).reason).toBe("TOKEN_REVOKED");
    const fresh = await anon().login({ username: user.username, password: "correct horse battery" });
    await expect(as(fresh.accessToken).getCurrentUser({})).resolves.toBeDefined();
  });

  it("stops a deleted user's access token on the next request", async () => {
    const { user, token } = await createUser([]);
    await as(adminToken).deleteUser({ id: user.id });
    expect((await rejection(as(token).getCurrentUser({}))).code).toBe(Code.Unauthenticated);
    expect((await rejection(as(adminToken).getUser({ id: user.id }))).code).toBe(Code.NotFound);
  });

  it("narrows an access token to the scopes its user still holds", async () => {
    const { user, token } = await createUser(["cluster:read", "swarm:deploy"]);
    await as(adminToken).updateUser({ id: user.id, scopes: { scopes: ["cluster:read"] } });
    const me = await as(token).getCurrentUser({});
    expect(me.permissions).toEqual(["cluster:read"]);
  });

  it("changes the caller's password and refuses the old one", async () => {
    const { user } = await createUser([]);
    const login = await anon().login({ username: user.username, password: "correct horse battery" });
    const wrong = await rejection(
      as(login.accessToken).changePassword({
        currentPassword: "nope nope nope",
        newPassword: "another good password",
      }),
    );
    expect(wrong.code).toBe(Code.Unauthenticated);
    await as(login.accessToken).changePassword({
      currentPassword: "correct horse battery",
      newPassword: "another good password",
    });
    expect(
      (await rejection(anon().login({ username: user.username, password: "correct horse battery" }))).reason,
    ).toBe("CREDENTIALS_INVALID");
    await expect(
      anon().login({ username: user.username, password: "another good password" }),
    ).resolves.toBeDefined();
    expect((await rejection(anon().refreshToken({ refreshToken: login.refreshToken }))).reason).toBe(
      "TOKEN_REVOKED",
    );
  });

  it("paginates ListUsers with a cursor", async () => {
    for (let i = 0; i < 3; i++) await createUser([]);
    const seen = new Set<string>();
    let token = "";
    let pages = 0;
    let total = 0;
    do {
      const page = await as(adminToken).listUsers({ pageSize: 2, pageToken: token });
      for (const u of page.users) seen.add(u.id);
      total = page.totalSize;
      token = page.nextPageToken;
      pages++;
    } while (token && pages < 100);
    expect(seen.size).toBe(total);
    expect(pages).toBeGreaterThan(1);
    expect((await rejection(as(adminToken).listUsers({ pageToken: "garbage" }))).code).toBe(
      Code.InvalidArgument,
    );
  });

  it("keeps tenants apart: another tenant's user reads as NotFound", async () => {
    const em = app.storage.em.fork();
    const other = em.create(Tenant, {
      id: randomUUID(),
      name: `other-${randomUUID().slice(0, 6)}`,
      disabled: false,
      createdAt: new Date(),
      updatedAt: new Date(),
    });
    await em.flush();
    const foreign = await as(adminToken).createUser({
      username: `f-${randomUUID().slice(0, 6)}`,
      password: "long enough password",
      tenantId: other.id,
      scopes: ["admin:users"],
    });
    const foreignToken = (
      await anon().login({
        username: foreign.user!.username,
        password: "long enough password",
        tenant: other.id,
      })
    ).accessToken;
    const local = await createUser([]);
    // The foreign tenant admin cannot see, change or delete the default tenant's user, and lists only its own.
    expect((await rejection(as(foreignToken).getUser({ id: local.user.id }))).code).toBe(Code.NotFound);
    expect((await rejection(as(foreignToken).updateUser({ id: local.user.id, disabled: true }))).code).toBe(
      Code.NotFound,
    );
    expect((await rejection(as(foreignToken).deleteUser({ id: local.user.id }))).code).toBe(Code.NotFound);
    expect((await rejection(as(foreignToken).getUser({ id: randomUUID() }))).code).toBe(Code.NotFound);
    const list = await as(foreignToken).listUsers({});
    expect(list.users.every((u) => u.tenantId === other.id)).toBe(true);
    expect(list.totalSize).toBe(1);
    // Only a * holder may place users in another tenant; to others it reads like a missing one.
    const r = await rejection(
      as(foreignToken).createUser({
        username: `g-${randomUUID().slice(0, 6)}`,
        password: "long enough password",
        tenantId: local.user.tenantId,
      }),
    );
    expect(r.code).toBe(Code.NotFound);
  });

  it("stores password hashes as PBKDF2-SHA256 with their parameters", async () => {
    const { user } = await createUser([]);
    const row = await app.sql.get<{ password_hash: string }>("select password_hash from users where id = ?", [
      user.id,
    ]);
    expect(row!.password_hash).toMatch(/^pbkdf2-sha256\$1000\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$/);
  });

  it("refuses to let an admin disable or delete itself", async () => {
    const me = await as(adminToken).getCurrentUser({});
    expect((await rejection(as(adminToken).updateUser({ id: me.id, disabled: true }))).code).toBe(
      Code.FailedPrecondition,
    );
    expect((await rejection(as(adminToken).deleteUser({ id: me.id }))).code).toBe(Code.FailedPrecondition);
  });
});

describe.each(DATABASES)("refresh token races on $name", (db) => {
  it("leaves no live session when the same refresh token is spent concurrently", async () => {
    const app = await createTestApp(db);
    try {
      const anon = clientFor(UserService, memoryTransport(app));
      const login = await anon.login({ username: "admin", password: ADMIN_PASSWORD });
      const results = await Promise.allSettled(
        Array.from({ length: 5 }, () => anon.refreshToken({ refreshToken: login.refreshToken })),
      );
      const winners = results.filter((r) => r.status === "fulfilled");
      expect(winners.length).toBeLessThanOrEqual(1);
      for (const w of winners) {
        const next = (w as PromiseFulfilledResult<{ refreshToken: string }>).value.refreshToken;
        expect((await rejection(anon.refreshToken({ refreshToken: next }))).reason).toBe("TOKEN_REVOKED");
      }
    } finally {
      await app.close();
    }
  });
});
