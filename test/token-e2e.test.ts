import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type App, createApp } from "../src/app.js";
import { Code, rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  dropSchema,
  memoryTransport,
  pinnableClock,
  silentLogger,
  startTestServer,
  type TestDatabase,
  type TestServer,
  testConfig,
  withHeaders,
} from "./helpers.js";

const PASSWORD = "correct horse battery staple";

describe.each(DATABASES)("token lifecycle over a real server on $name", (db) => {
  let ts: TestServer;
  let agent: Agent;
  let adminJwt: string;
  // The machine's time, pinned by the expiry test to step the server across an instant.
  const clock = pinnableClock();
  const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
    undiciFetch(`${ts.server.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(body),
      dispatcher: agent,
    });

  beforeAll(async () => {
    ts = await startTestServer(db, {}, undefined, { clock: clock.now });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
    adminJwt = (
      await createClient(UserService, ts.grpc()).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
  });
  afterAll(async () => {
    await agent.close();
    await ts.close();
  });

  it("creates, uses, lists, revokes and then refuses a personal access token over gRPC", async () => {
    const grpc = ts.grpc();
    const created = await clientFor(TokenService, grpc, adminJwt).createPersonalAccessToken({
      name: "grpc cli",
      scopes: ["admin:users"],
    });
    expect(created.token.startsWith("tsr_pat_")).toBe(true);

    const asBearer = await clientFor(UserService, grpc, created.token).getCurrentUser({});
    expect(asBearer.username).toBe("admin");
    expect(asBearer.permissions).toEqual(["admin:users"]);
    const asApiKey = await createClient(
      UserService,
      withHeaders(grpc, { "x-api-key": created.token }),
    ).listUsers({});
    expect(asApiKey.users.some((u) => u.username === "admin")).toBe(true);

    const listed = await clientFor(TokenService, grpc, created.token).listPersonalAccessTokens({});
    const mine = listed.tokens.find((t) => t.id === created.id);
    expect(mine?.hint).toBe(created.hint);
    expect(JSON.stringify(listed, (_k, v) => (typeof v === "bigint" ? v.toString() : v))).not.toContain(
      created.token,
    );

    await clientFor(TokenService, grpc, adminJwt).revokePersonalAccessToken({ id: created.id });
    for (const client of [
      clientFor(UserService, grpc, created.token),
      createClient(UserService, withHeaders(grpc, { "x-api-key": created.token })),
    ]) {
      const r = await rejection(client.getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_REVOKED");
      expect(r.error.metadata.get("www-authenticate")).toContain('error="invalid_token"');
    }
  });

  it("creates, uses, lists, revokes and then refuses an API key with Connect JSON", async () => {
    // The seed's flow: log in, create a key, use it with X-API-Key.
    await post(
      "/tessera.v1.UserService/CreateUser",
      { username: "integrator", password: PASSWORD, scopes: ["cluster:read"] },
      { authorization: `Bearer ${adminJwt}` },
    );
    const login = await post("/tessera.v1.UserService/Login", { username: "integrator", password: PASSWORD });
    const { accessToken } = (await login.json()) as { accessToken: string };

    const res = await post(
      "/tessera.v1.TokenService/CreateApiKey",
      { name: "automation", expiresAt: "2099-01-01T00:00:00Z" },
      { authorization: `Bearer ${accessToken}` },
    );
    expect(res.status).toBe(200);
    const created = (await res.json()) as {
      id: string;
      name: string;
      key: string;
      createdAt: string;
      expiresAt: string;
      hint: string;
    };
    expect(created.name).toBe("automation");
    expect(created.key).toMatch(/^tsr_key_[0-9A-Za-z]{54}$/);
    expect(created.expiresAt).toBe("2099-01-01T00:00:00Z");
    expect(Date.parse(created.createdAt)).toBeGreaterThan(0);

    const me = await post("/tessera.v1.UserService/GetCurrentUser", {}, { "x-api-key": created.key });
    expect(me.status).toBe(200);
    expect(((await me.json()) as { username: string; permissions: string[] }).permissions).toEqual([
      "cluster:read",
    ]);
    const bearer = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Bearer ${created.key}` },
    );
    expect(bearer.status).toBe(200);

    const list = await post("/tessera.v1.TokenService/ListApiKeys", {}, { "x-api-key": created.key });
    expect(list.status).toBe(200);
    const text = await list.text();
    expect(text).not.toContain(created.key);
    expect(text).not.toContain("pbkdf2");
    expect(text).not.toContain("secret");
    const body = JSON.parse(text) as { apiKeys: { id: string; hint: string; name: string; kind: string }[] };
    expect(body.apiKeys).toEqual([
      expect.objectContaining({
        id: created.id,
        hint: created.hint,
        name: "automation",
        kind: "TOKEN_KIND_API_KEY",
      }),
    ]);

    const revoked = await post(
      "/tessera.v1.TokenService/RevokeApiKey",
      { id: created.id },
      { authorization: `Bearer ${accessToken}` },
    );
    expect(revoked.status).toBe(200);
    expect(((await revoked.json()) as { apiKey: { revoked: boolean } }).apiKey.revoked).toBe(true);

    const refused = await post("/tessera.v1.UserService/GetCurrentUser", {}, { "x-api-key": created.key });
    expect(refused.status).toBe(401);
    expect(refused.headers.get("www-authenticate")).toContain('error="invalid_token"');
    const refusedText = await refused.text();
    expect(refusedText).not.toContain(created.key);
    expect(JSON.parse(refusedText).details[0].debug.reason).toBe("TOKEN_REVOKED");
  });

  it("answers 401 TOKEN_INVALID for a token with a typo, and 400 for a token sent twice over Connect JSON", async () => {
    const res = await post(
      "/tessera.v1.TokenService/CreatePersonalAccessToken",
      { name: "typo" },
      { authorization: `Bearer ${adminJwt}` },
    );
    const { token } = (await res.json()) as { token: string };
    const typo = `${token.slice(0, -1)}${token.endsWith("0") ? "1" : "0"}`;
    const bad = await post("/tessera.v1.UserService/GetCurrentUser", {}, { authorization: `Bearer ${typo}` });
    expect(bad.status).toBe(401);
    const badText = await bad.text();
    expect(badText).not.toContain(typo);
    expect(JSON.parse(badText).details[0].debug.reason).toBe("TOKEN_INVALID");

    const both = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Bearer ${token}`, "x-api-key": token },
    );
    expect(both.status).toBe(400);
    expect(JSON.parse(await both.text()).details[0].debug.reason).toBe("MULTIPLE_CREDENTIALS");

    const malformed = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Token ${token}` },
    );
    expect(malformed.status).toBe(401);
    const malformedText = await malformed.text();
    expect(malformedText).not.toContain(token);
    expect(JSON.parse(malformedText).details[0].debug.reason).toBe("AUTH_HEADER_MALFORMED");
  });

  it("answers 401 TOKEN_EXPIRED for an expired token over gRPC", async () => {
    const grpc = ts.grpc();
    const expiresAt = new Date(Date.now() + 3_600_000);
    const created = await clientFor(TokenService, grpc, adminJwt).createApiKey({
      name: "short-lived",
      expiresAt: {
        seconds: BigInt(Math.floor(expiresAt.getTime() / 1000)),
        nanos: (expiresAt.getTime() % 1000) * 1e6,
      },
    });
    await clientFor(UserService, grpc, created.key).getCurrentUser({});
    try {
      // The server's clock stepped across the expiry: accepted at its last millisecond, refused at it.
      clock.pin(expiresAt.getTime() - 1);
      await clientFor(UserService, grpc, created.key).getCurrentUser({});
      clock.pin(expiresAt.getTime());
      const r = await rejection(clientFor(UserService, grpc, created.key).getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_EXPIRED");
    } finally {
      clock.release();
    }
  });
});

/** A database URL that outlives one app: a file for SQLite, a named schema for PostgreSQL. */
function durableUrl(db: TestDatabase): { url: string; cleanup: () => Promise<void> } {
  if (db.name === "sqlite") {
    const dir = mkdtempSync(join(tmpdir(), "tessera-tokens-"));
    return {
      url: `sqlite:${join(dir, "x.db")}`,
      cleanup: async () => rmSync(dir, { recursive: true, force: true }),
    };
  }
  const url = db.url();
  return { url, cleanup: () => dropSchema(url) };
}

describe.each(DATABASES)("token durability across a restart on $name", (db) => {
  it("keeps a revocation and a live token across a restart", async () => {
    const { url, cleanup } = durableUrl(db);
    let first: App | undefined;
    let second: App | undefined;
    try {
      first = await createApp(testConfig(url), { logger: silentLogger });
      const jwt = (
        await clientFor(UserService, memoryTransport(first)).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        })
      ).accessToken;
      const tokens = clientFor(TokenService, memoryTransport(first), jwt);
      const revokedPat = await tokens.createPersonalAccessToken({ name: "revoked before restart" });
      const livePat = await tokens.createPersonalAccessToken({ name: "live" });
      const liveKey = await tokens.createApiKey({ name: "live key" });
      await clientFor(UserService, memoryTransport(first), livePat.token).getCurrentUser({});
      await tokens.revokePersonalAccessToken({ id: revokedPat.id });
      await first.close();
      first = undefined;

      second = await createApp(testConfig(url), { logger: silentLogger });
      const r = await rejection(
        clientFor(UserService, memoryTransport(second), revokedPat.token).getCurrentUser({}),
      );
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_REVOKED");
      expect(
        (await clientFor(UserService, memoryTransport(second), livePat.token).getCurrentUser({})).username,
      ).toBe("admin");
      const viaKey = createClient(
        UserService,
        withHeaders(memoryTransport(second), { "x-api-key": liveKey.key }),
      );
      expect((await viaKey.getCurrentUser({})).username).toBe("admin");
      // The use before the restart was flushed at shutdown.
      const listed = await clientFor(
        TokenService,
        memoryTransport(second),
        livePat.token,
      ).listPersonalAccessTokens({ includeRevoked: true });
      expect(listed.tokens.find((t) => t.id === livePat.id)?.lastUsedAt).toBeDefined();
      expect(listed.tokens.find((t) => t.id === revokedPat.id)?.revoked).toBe(true);
    } finally {
      await first?.close();
      await second?.close();
      await cleanup();
    }
  });
});
