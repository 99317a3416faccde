import { randomBytes, webcrypto } from "node:crypto";
import http2 from "node:http2";
import { Code } from "@connectrpc/connect";
import { SignJWT } from "jose";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { App } from "../src/app.js";
import { createUserClaimsLoader } from "../src/auth/user-principal.js";
import { createManualClock } from "../src/clock.js";
import type { RequestState } from "../src/context.js";
import { TesseraError } from "../src/errors.js";
import { UserStateRepository } from "../src/storage/repositories/subject-state.js";
import { toMillis } from "../src/storage/sql.js";
import { rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestApp,
  DATABASES,
  memoryTransport,
  startTestServer,
  type TestServer,
} from "./helpers.js";

/**
 * The per-request path made cheaper for the benchmark (issue 4) must decide exactly as
 * before: these tests pin what the shortcuts may never change.
 */

const JWT_SECRET = "a-jwt-secret-for-hot-path-tests-0123456789";

/** An access token with Tessera's shape and header, signed with a key Tessera does not hold. */
function forgedToken(): Promise<string> {
  return new SignJWT({ tid: "00000000-0000-4000-8000-000000000000", scope: "*", pk: "user" })
    .setProtectedHeader({ alg: "HS256", kid: "hs256", typ: "at+jwt" })
    .setIssuer("tessera")
    .setAudience("tessera")
    .setSubject("00000000-0000-4000-8000-000000000001")
    .setIssuedAt()
    .setExpirationTime("1h")
    .sign(randomBytes(32));
}

describe.each(DATABASES)("hot path ($name)", (db) => {
  let app: App;
  let adminToken: string;

  beforeAll(async () => {
    app = await createTestApp(db, { auth: { jwt: { secret: JWT_SECRET } } });
    const login = await clientFor(UserService, memoryTransport(app)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    adminToken = login.accessToken;
  });
  afterAll(async () => {
    await app.close();
  });

  it("refuses a replayed forged access token every time, verifying its signature only once", async () => {
    const forged = await forgedToken();
    const verify = vi.spyOn(webcrypto.subtle, "verify");
    try {
      const refusal = (p: Promise<unknown>) =>
        p.then(
          () => expect.unreachable("accepted a forged token"),
          (e: unknown) => e as TesseraError,
        );
      const first = await refusal(app.jwt.verify(forged));
      const calls = verify.mock.calls.length;
      const second = await refusal(app.jwt.verify(forged));
      expect(first).toBeInstanceOf(TesseraError);
      expect(second).toBeInstanceOf(TesseraError);
      expect(first.reason).toBe("TOKEN_INVALID");
      expect(second.reason).toBe("TOKEN_INVALID");
      expect(second.message).toBe(first.message);
      expect(calls).toBe(1);
      expect(verify.mock.calls.length).toBe(1);
    } finally {
      verify.mockRestore();
    }
    // The genuine token is untouched by the forgeries.
    const me = await clientFor(UserService, memoryTransport(app), adminToken).getCurrentUser({});
    expect(me.username).toBe("admin");
  });

  it("refuses a replayed forged access token from the authenticator's memory, without verifying it again", async () => {
    const forged = await forgedToken();
    const call = () => clientFor(UserService, memoryTransport(app), forged).getCurrentUser({});
    const verify = vi.spyOn(app.jwt, "verify");
    try {
      const first = await rejection(call());
      expect(verify).toHaveBeenCalledTimes(1);
      expect(app.jwt.isForged(forged)).toBe(true);
      const second = await rejection(call());
      // Refused the same way, and the JWT service was not asked again.
      expect(verify).toHaveBeenCalledTimes(1);
      for (const r of [first, second]) {
        expect(r.code).toBe(Code.Unauthenticated);
        expect(r.reason).toBe("TOKEN_INVALID");
        expect(r.message).toBe("access token is invalid");
      }
      // A token that is merely unknown is not remembered as forged.
      expect(app.jwt.isForged(`${forged}x`)).toBe(false);
    } finally {
      verify.mockRestore();
    }
  });

  it("accepts a token verified before from the JWT service's memory, without calling verify again", async () => {
    const login = await clientFor(UserService, memoryTransport(app)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const token = login.accessToken;
    const call = () => clientFor(UserService, memoryTransport(app), token).getCurrentUser({});
    // A token not yet verified is not in memory: the first request verifies it.
    expect(app.jwt.verifiedClaims(token)).toBeUndefined();
    const verify = vi.spyOn(app.jwt, "verify");
    try {
      expect((await call()).username).toBe("admin");
      expect(verify).toHaveBeenCalledTimes(1);
      expect(app.jwt.verifiedClaims(token)?.sub).toBe(login.user?.id);
      expect((await call()).username).toBe("admin");
      expect(verify).toHaveBeenCalledTimes(1);
      // A token that only looks like it (one more character) is verified, and refused.
      const bad = await rejection(
        clientFor(UserService, memoryTransport(app), `${token}x`).getCurrentUser({}),
      );
      expect(bad.reason).toBe("TOKEN_INVALID");
      expect(verify).toHaveBeenCalledTimes(2);
    } finally {
      verify.mockRestore();
    }
  });

  it("answers GetCurrentUser for a personal access token from the row its verification read, the same as for a JWT", async () => {
    const viaJwt = await clientFor(UserService, memoryTransport(app), adminToken).getCurrentUser({});
    const { token } = await clientFor(
      TokenService,
      memoryTransport(app),
      adminToken,
    ).createPersonalAccessToken({ name: "hot-path" });
    const viaPat = await clientFor(UserService, memoryTransport(app), token).getCurrentUser({});
    expect(viaPat.id).toBe(viaJwt.id);
    expect(viaPat.username).toBe(viaJwt.username);
    expect(viaPat.tenantId).toBe(viaJwt.tenantId);
    expect(viaPat.createdAt).toEqual(viaJwt.createdAt);
  });

  it("gives a personal access token seen before the same frozen principal and owner, until it is revoked", async () => {
    const created = await clientFor(TokenService, memoryTransport(app), adminToken).createPersonalAccessToken(
      { name: "shared-principal" },
    );
    const credential = { type: "bearer" as const, token: created.token };
    const state = (): RequestState => ({
      requestId: "r",
      ip: "127.0.0.1",
      certificate: null,
      principal: null,
    });
    const first = state();
    const p1 = await app.authenticator.authenticate(credential, first);
    const second = state();
    const p2 = await app.authenticator.authenticate(credential, second);
    expect(p2).toBe(p1);
    expect(second.user).toBe(first.user);
    expect(Object.isFrozen(p1)).toBe(true);
    expect(Object.isFrozen(p1!.scopes)).toBe(true);
    expect(Object.isFrozen(first.user)).toBe(true);
    expect(p1).toMatchObject({ method: "pat", credentialId: created.id });
    await clientFor(TokenService, memoryTransport(app), adminToken).revokePersonalAccessToken({
      id: created.id,
    });
    await expect(
      Promise.resolve().then(() => app.authenticator.authenticate(credential, state())),
    ).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
  });

  it("answers GetCurrentUser from the row of this request, and refuses the next request once the user is disabled", async () => {
    const as = (token: string) => clientFor(UserService, memoryTransport(app), token);
    const created = await as(adminToken).createUser({
      username: `hot-${randomBytes(3).toString("hex")}`,
      password: "a-long-enough-password",
      scopes: [],
    });
    const session = await clientFor(UserService, memoryTransport(app)).login({
      username: created.user!.username,
      password: "a-long-enough-password",
    });
    const me = await as(session.accessToken).getCurrentUser({});
    expect(me.id).toBe(created.user!.id);
    expect(me.tenantId).toBe(created.user!.tenantId);
    expect(me.createdAt?.seconds).toBe(created.user!.createdAt?.seconds);
    await as(adminToken).updateUser({ id: created.user!.id, disabled: true });
    const refused = await rejection(as(session.accessToken).getCurrentUser({}));
    expect(refused.code).toBe(Code.Unauthenticated);
    expect(refused.reason).toBe("PRINCIPAL_DISABLED");
  });

  it("gives a JWT seen before the same frozen principal, and a new one once its user's row changes", async () => {
    const as = (token: string) => clientFor(UserService, memoryTransport(app), token);
    const created = await as(adminToken).createUser({
      username: `shared-${randomBytes(3).toString("hex")}`,
      password: "a-long-enough-password",
      scopes: ["tokens:read", "tokens:write"],
    });
    const session = await clientFor(UserService, memoryTransport(app)).login({
      username: created.user!.username,
      password: "a-long-enough-password",
    });
    const credential = { type: "bearer" as const, token: session.accessToken };
    const state = () => ({ requestId: "r", ip: "127.0.0.1", certificate: null, principal: null });
    const first = await app.authenticator.authenticate(credential, state());
    const again = await app.authenticator.authenticate(credential, state());
    expect(again).toBe(first);
    expect(Object.isFrozen(first)).toBe(true);
    expect(Object.isFrozen(first!.scopes)).toBe(true);
    expect(first!.scopes).toEqual(["tokens:read", "tokens:write"]);
    // A scope taken away: the next request's principal holds what the user holds now.
    await as(adminToken).updateUser({ id: created.user!.id, scopes: { scopes: ["tokens:read"] } });
    const after = await app.authenticator.authenticate(credential, state());
    expect(after).not.toBe(first);
    expect(after!.scopes).toEqual(["tokens:read"]);
    expect(first!.scopes).toEqual(["tokens:read", "tokens:write"]);
    // And the session ended: refused, whatever was made before.
    await as(session.accessToken).logout({ refreshToken: session.refreshToken });
    await expect(
      Promise.resolve().then(() => app.authenticator.authenticate(credential, state())),
    ).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
  });

  it("reads no clock for a JWT ending by its session's end, and ends one minted past it at that end, memoized or not", async () => {
    const session = await clientFor(UserService, memoryTransport(app)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const claims = await app.jwt.verify(session.accessToken);
    const t = createManualClock();
    const reads = vi.fn(t.now);
    const load = createUserClaimsLoader(new UserStateRepository(app.sql), {
      sessionMaxLifetime: 3600,
      now: reads,
    });
    const state = () => ({ requestId: "r", ip: "127.0.0.1", certificate: null, principal: null });
    await load(claims, state());
    expect((await load(claims, state())).expiresAt).toBe(claims.exp * 1000);
    expect(reads).not.toHaveBeenCalled();

    // As an instance with no bound mints it: an exp past the session's end.
    const [row] = await app.sql.all<{ created_at: unknown }>("select created_at from sessions where id = ?", [
      claims.sid,
    ]);
    const end = Math.floor((toMillis(row!.created_at)! + 3600_000) / 1000) * 1000;
    const late = { ...claims, exp: end / 1000 + 600 };
    t.set(end - 1);
    const first = await load(late, state());
    expect(first.expiresAt).toBe(end);
    expect(await load(late, state())).toBe(first);
    t.set(end);
    await expect(Promise.resolve().then(() => load(late, state()))).rejects.toMatchObject({
      reason: "TOKEN_EXPIRED",
    });
    // One with no bound: no clock either.
    reads.mockClear();
    const unbounded = createUserClaimsLoader(new UserStateRepository(app.sql), { now: reads });
    expect((await unbounded(late, state())).expiresAt).toBe(late.exp * 1000);
    expect(reads).not.toHaveBeenCalled();
  });
});

describe("errors", () => {
  it("capture no stack trace for a refusal, and keep it for a fault", () => {
    const refusal = new TesseraError("TOKEN_INVALID", "token is not recognised");
    const fault = new TesseraError("INTERNAL", "something broke");
    expect(refusal.stack).toBe("TesseraError: token is not recognised");
    expect(fault.stack).toMatch(/\n\s+at /);
    // The limit is restored for every other error.
    expect(new Error("plain").stack).toMatch(/\n\s+at /);
  });
});

describe.each(DATABASES)("Connect JSON error envelope ($name)", (db) => {
  let ts: TestServer;
  let agent: Agent;
  beforeAll(async () => {
    ts = await startTestServer(db, { auth: { jwt: { secret: JWT_SECRET } } });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent.close();
    await ts.close();
  });

  it("puts ok, error and reason first and request_id last, around Connect's own fields, with a matching Content-Length", async () => {
    const res = await undiciFetch(`${ts.server.url}/tessera.v1.UserService/GetCurrentUser`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${await forgedToken()}` },
      body: "{}",
      dispatcher: agent,
    });
    const text = await res.text();
    expect(res.status).toBe(401);
    expect(Number(res.headers.get("content-length"))).toBe(Buffer.byteLength(text));
    const body = JSON.parse(text) as Record<string, unknown>;
    expect(Object.keys(body)).toEqual(["ok", "error", "reason", "code", "message", "details", "request_id"]);
    expect(body).toMatchObject({
      ok: false,
      error: "Unauthorized",
      reason: "TOKEN_INVALID",
      code: "unauthenticated",
      request_id: res.headers.get("x-request-id"),
    });
    const debug = (body.details as { debug: { reason: string; metadata: Record<string, string> } }[])[0]!
      .debug;
    expect(debug.reason).toBe("TOKEN_INVALID");
    expect(debug.metadata.request_id).toBe(body.request_id);
  });
});

describe.each(DATABASES)("rate-limit headers of an admitted call ($name)", (db) => {
  let ts: TestServer;
  let adminToken: string;
  let session: http2.ClientHttp2Session;
  beforeAll(async () => {
    ts = await startTestServer(db, { auth: { jwt: { secret: JWT_SECRET } }, rateLimit: { enabled: true } });
    const login = await clientFor(UserService, memoryTransport(ts.app)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    adminToken = login.accessToken;
    session = http2.connect(ts.server.url, { ca: ts.certs.ca });
    session.on("error", () => undefined);
  });
  afterAll(async () => {
    session.close();
    await ts.close();
  });

  /** GetCurrentUser over HTTP/2 (node:http2, which makes no fetch Headers), counting the Headers the server makes meanwhile. */
  async function getCurrentUser(contentType: string, body: Uint8Array) {
    const made = { count: 0 };
    const Global = globalThis.Headers;
    globalThis.Headers = class Counted extends Global {
      constructor(init?: ConstructorParameters<typeof Headers>[0]) {
        super(init);
        made.count++;
      }
    };
    try {
      const answer = await new Promise<{
        headers: http2.IncomingHttpHeaders;
        trailers: http2.IncomingHttpHeaders;
      }>((resolve, reject) => {
        const stream = session.request({
          ":method": "POST",
          ":path": "/tessera.v1.UserService/GetCurrentUser",
          "content-type": contentType,
          te: "trailers",
          authorization: `Bearer ${adminToken}`,
        });
        let headers: http2.IncomingHttpHeaders = {};
        let trailers: http2.IncomingHttpHeaders = {};
        stream.on("response", (h) => (headers = h));
        stream.on("trailers", (t) => (trailers = t));
        stream.on("data", () => undefined);
        stream.on("error", reject);
        stream.on("end", () => resolve({ headers, trailers }));
        stream.end(body);
      });
      return { ...answer, made: made.count };
    } finally {
      globalThis.Headers = Global;
    }
  }

  it("are answered over Connect JSON and gRPC, the fast transport making no fetch Headers for them", async () => {
    const fast = ts.app.config.server.transport === "fast";
    const json = await getCurrentUser("application/json", new TextEncoder().encode("{}"));
    const grpc = await getCurrentUser("application/grpc", new Uint8Array(5));
    for (const answer of [json, grpc]) {
      expect(answer.headers["x-ratelimit-limit"]).toBe(String(ts.app.config.rateLimit.perIpPerMinute));
      expect(Number(answer.headers["x-ratelimit-remaining"])).toBeGreaterThan(0);
      expect(Number(answer.headers["x-ratelimit-reset"])).toBeGreaterThan(0);
      if (fast) expect(answer.made).toBe(0);
    }
    expect(json.headers[":status"]).toBe(200);
    expect(json.headers["content-type"]).toBe("application/json");
    expect(grpc.headers["content-type"]).toMatch(/^application\/grpc/);
    expect(grpc.trailers["grpc-status"]).toBe("0");
  });

  it("carry exactly the request id, the security headers, the content's and the limit's, on Connect JSON and gRPC", async () => {
    const security = {
      "x-content-type-options": "nosniff",
      "x-frame-options": "DENY",
      "x-xss-protection": "1; mode=block",
      "content-security-policy": "default-src 'self'",
      "strict-transport-security": "max-age=31536000; includeSubDomains",
    };
    const limit = String(ts.app.config.rateLimit.perIpPerMinute);
    const first = await getCurrentUser("application/json", new TextEncoder().encode("{}"));
    const json = await getCurrentUser("application/json", new TextEncoder().encode("{}"));
    const grpc = await getCurrentUser("application/grpc", new Uint8Array(5));
    const answers = [
      { answer: json, type: "application/json" },
      { answer: grpc, type: "application/grpc+proto" },
    ];
    for (const { answer, type } of answers) {
      const { date, "x-request-id": id, "content-length": length, ...rest } = answer.headers;
      // Its string keys: node:http2 adds a symbol of its own.
      expect(Object.fromEntries(Object.entries(rest))).toEqual({
        ":status": 200,
        ...security,
        "content-type": type,
        "x-ratelimit-limit": limit,
        "x-ratelimit-remaining": expect.stringMatching(/^[0-9]+$/),
        "x-ratelimit-reset": expect.stringMatching(/^[1-9][0-9]*$/),
      });
      expect(date).toBeTruthy();
      expect(id).toMatch(/^[0-9a-f-]{36}$/);
      // A Connect answer says its length; a gRPC one is framed.
      if (type === "application/json") expect(Number(length)).toBeGreaterThan(2);
      else expect(length).toBeUndefined();
    }
    // The tighter limit's count, one call later: one fewer left (per IP, every call counts).
    expect(Number(json.headers["x-ratelimit-remaining"])).toBe(
      Number(first.headers["x-ratelimit-remaining"]) - 1,
    );
  });
});
