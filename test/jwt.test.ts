import { createLocalJWKSet, decodeJwt, decodeProtectedHeader, jwtVerify } from "jose";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createManualClock } from "../src/clock.js";
import { Code, rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestApp,
  DATABASES,
  memoryTransport,
  SQLITE,
  startTestServer,
  type TestServer,
} from "./helpers.js";

describe.each(["EdDSA", "ES256"] as const)("asymmetric %s signing keys", (algorithm) => {
  let ts: TestServer;
  let agent: Agent;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { auth: { jwt: { algorithm } } });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent.close();
    await ts.close();
  });

  it("serves the public keys at /.well-known/jwks.json and tokens verify offline against them with their scopes", async () => {
    const login = await clientFor(UserService, memoryTransport(ts.app)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const res = await undiciFetch(`${ts.server.url}/.well-known/jwks.json`, { dispatcher: agent });
    expect(res.status).toBe(200);
    const jwks = (await res.json()) as { keys: { kid: string; alg: string; d?: string }[] };
    expect(jwks.keys.length).toBe(1);
    expect(jwks.keys[0]!.alg).toBe(algorithm);
    expect(jwks.keys[0]!.d).toBeUndefined();
    const { payload, protectedHeader } = await jwtVerify(
      login.accessToken,
      createLocalJWKSet(jwks as never),
      { issuer: "tessera", audience: "tessera" },
    );
    expect(protectedHeader.typ).toBe("at+jwt");
    expect(payload.scope).toBe("*");
    expect(payload.sub).toBe(login.user!.id);
  });

  it("rotates at once when asked: the new key signs, the old key keeps verifying its tokens", async () => {
    const anon = clientFor(UserService, memoryTransport(ts.app));
    const before = await anon.login({ username: "admin", password: ADMIN_PASSWORD });
    const oldKid = decodeProtectedHeader(before.accessToken).kid;
    await ts.app.jwt.rotate({ immediate: true });
    const after = await anon.login({ username: "admin", password: ADMIN_PASSWORD });
    const newKid = decodeProtectedHeader(after.accessToken).kid;
    expect(newKid).not.toBe(oldKid);
    expect(
      ts.app.jwt
        .jwks()
        .keys.map((k) => k.kid)
        .sort(),
    ).toEqual([oldKid, newKid].sort());
    await expect(
      clientFor(UserService, memoryTransport(ts.app), before.accessToken).getCurrentUser({}),
    ).resolves.toBeDefined();
    await expect(
      clientFor(UserService, memoryTransport(ts.app), after.accessToken).getCurrentUser({}),
    ).resolves.toBeDefined();
  });
});

describe.each(DATABASES)("signing keys persist on $name", (db) => {
  it("stores the generated key so tokens survive a restart of the JWT service", async () => {
    const app = await createTestApp(db);
    try {
      const login = await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const rows = await app.sql.all<{ kid: string }>("select kid from signing_keys");
      expect(rows).toHaveLength(1);
      expect(rows[0]!.kid).toBe(decodeProtectedHeader(login.accessToken).kid);
    } finally {
      await app.close();
    }
  });
});

describe("JWT claim checks", () => {
  it("refuses a token from another issuer or audience", async () => {
    const secret = "x".repeat(40);
    const a = await createTestApp(SQLITE, { auth: { jwt: { secret, issuer: "other-issuer" } } });
    const b = await createTestApp(SQLITE, { auth: { jwt: { secret, audience: "other-audience" } } });
    const c = await createTestApp(SQLITE, { auth: { jwt: { secret } } });
    try {
      const fromA = (
        await clientFor(UserService, memoryTransport(a)).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        })
      ).accessToken;
      const fromB = (
        await clientFor(UserService, memoryTransport(b)).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        })
      ).accessToken;
      for (const token of [fromA, fromB]) {
        const r = await rejection(clientFor(UserService, memoryTransport(c), token).getCurrentUser({}));
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe("TOKEN_INVALID");
      }
    } finally {
      await a.close();
      await b.close();
      await c.close();
    }
  });

  it("expires access tokens after their configured lifetime (no skew)", async () => {
    // On a manual clock: the token is tried at the last millisecond of its life and at its `exp`.
    const clock = createManualClock();
    const app = await createTestApp(
      SQLITE,
      { auth: { jwt: { accessTokenTtl: 2, clockSkew: 0 } } },
      { clock: clock.now },
    );
    try {
      const login = await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const client = clientFor(UserService, memoryTransport(app), login.accessToken);
      await expect(client.getCurrentUser({})).resolves.toBeDefined();
      // The lifetime is what is tested: valid until just before the token's own `exp`, and no longer.
      const { exp, iat } = decodeJwt(login.accessToken) as { exp: number; iat: number };
      expect(exp - iat).toBe(2);
      clock.set(exp * 1000 - 1);
      await expect(client.getCurrentUser({})).resolves.toBeDefined();
      clock.set(exp * 1000);
      expect((await rejection(client.getCurrentUser({}))).reason).toBe("TOKEN_EXPIRED");
    } finally {
      await app.close();
    }
  });
});
