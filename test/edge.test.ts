import http2 from "node:http2";
import { createClient } from "@connectrpc/connect";
import { Agent, fetch as undiciFetch } from "undici";
import { describe, expect, it } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { Code, rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestApp,
  DATABASES,
  memoryTransport,
  SQLITE,
  startTestServer,
  withHeaders,
} from "./helpers.js";

const basic = (user: string, pass: string) => `Basic ${Buffer.from(`${user}:${pass}`).toString("base64")}`;

describe("rate limits", () => {
  it("refuses over the per-IP limit with ResourceExhausted, Retry-After and X-RateLimit headers on every protocol", async () => {
    const ts = await startTestServer(SQLITE, { rateLimit: { enabled: true, perIpPerMinute: 3 } });
    const agent = new Agent({ connect: { ca: ts.certs.ca } });
    try {
      const health = await undiciFetch(`${ts.server.url}/tessera.v1.UserService/Login`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ username: "admin", password: ADMIN_PASSWORD }),
        dispatcher: agent,
      });
      expect(health.status).toBe(200);
      expect(health.headers.get("x-ratelimit-limit")).toBe("3");
      expect(health.headers.get("x-ratelimit-remaining")).toBe("2");
      const users = createClient(UserService, ts.connect());
      await users.login({ username: "admin", password: ADMIN_PASSWORD });
      await users.login({ username: "admin", password: ADMIN_PASSWORD });
      const grpcRefused = await rejection(
        createClient(UserService, ts.grpc()).login({ username: "admin", password: ADMIN_PASSWORD }),
      );
      expect(grpcRefused.code).toBe(Code.ResourceExhausted);
      expect(grpcRefused.reason).toBe("RATE_LIMITED");
      expect(Number(grpcRefused.error.metadata.get("retry-after"))).toBeGreaterThan(0);
      const refused = await undiciFetch(`${ts.server.url}/tessera.v1.UserService/Login`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ username: "admin", password: ADMIN_PASSWORD }),
        dispatcher: agent,
      });
      expect(refused.status).toBe(429);
      expect(refused.headers.get("x-ratelimit-limit")).toBe("3");
      expect(refused.headers.get("x-ratelimit-remaining")).toBe("0");
      expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);
      expect(((await refused.json()) as { code: string }).code).toBe("resource_exhausted");
    } finally {
      await agent.close();
      await ts.close();
    }
  });

  it("stops an IP after too many failed logins, even with the right password", async () => {
    const app = await createTestApp(SQLITE, { rateLimit: { enabled: true, authFailuresPerIpPerMinute: 3 } });
    try {
      const anon = clientFor(UserService, memoryTransport(app));
      for (let i = 0; i < 3; i++)
        expect((await rejection(anon.login({ username: "admin", password: "wrong password!" }))).reason).toBe(
          "CREDENTIALS_INVALID",
        );
      const r = await rejection(anon.login({ username: "admin", password: ADMIN_PASSWORD }));
      expect(r.code).toBe(Code.ResourceExhausted);
      // Bad credentials on protected methods count too, and are refused before verification.
      const bad = await rejection(
        clientFor(UserService, memoryTransport(app), "not.a.jwt").getCurrentUser({}),
      );
      expect(bad.code).toBe(Code.ResourceExhausted);
    } finally {
      await app.close();
    }
  });
});

describe("CORS and readiness", () => {
  it("answers a preflight from an allowed origin and ignores others", async () => {
    const ts = await startTestServer(SQLITE, { cors: { allowedOrigins: ["https://app.example.com"] } });
    const agent = new Agent({ connect: { ca: ts.certs.ca } });
    try {
      const pre = await undiciFetch(`${ts.server.url}/tessera.v1.UserService/Login`, {
        method: "OPTIONS",
        headers: {
          origin: "https://app.example.com",
          "access-control-request-method": "POST",
          "access-control-request-headers": "content-type,authorization",
        },
        dispatcher: agent,
      });
      expect(pre.status).toBe(204);
      expect(pre.headers.get("access-control-allow-origin")).toBe("https://app.example.com");
      expect(pre.headers.get("access-control-allow-methods")).toBe("GET, POST, PUT, DELETE, OPTIONS");
      expect(pre.headers.get("access-control-allow-headers")?.toLowerCase()).toContain("authorization");
      expect(pre.headers.get("access-control-max-age")).toBe("86400");
      const other = await undiciFetch(`${ts.server.url}/health`, {
        headers: { origin: "https://evil.example" },
        dispatcher: agent,
      });
      expect(other.headers.get("access-control-allow-origin")).toBeNull();
      const ok = await undiciFetch(`${ts.server.url}/health`, {
        headers: { origin: "https://app.example.com" },
        dispatcher: agent,
      });
      expect(ok.headers.get("access-control-expose-headers")).toContain("X-Request-Id");
      // A cacheable answer to a request without Origin varies by Origin too: a shared cache
      // must not serve it to the allowed origin's browser, which would miss its CORS headers.
      const keys = await undiciFetch(`${ts.server.url}/.well-known/jwks.json`, { dispatcher: agent });
      expect(keys.headers.get("cache-control")).toBe("public, max-age=300");
      expect(keys.headers.get("vary")).toBe("Origin");
      expect(ok.headers.get("vary")).toBe("Origin");
    } finally {
      await agent.close();
      await ts.close();
    }
  });

  it("answers /ready with 503 when the database is down, and echoes a sane request id", async () => {
    const ts = await startTestServer(SQLITE);
    const agent = new Agent({ connect: { ca: ts.certs.ca } });
    try {
      const echoed = await undiciFetch(`${ts.server.url}/ready`, {
        headers: { "x-request-id": "trace-123" },
        dispatcher: agent,
      });
      expect(echoed.status).toBe(200);
      expect(echoed.headers.get("x-request-id")).toBe("trace-123");
      const replaced = await undiciFetch(`${ts.server.url}/ready`, {
        headers: { "x-request-id": "bad id\twith tab" },
        dispatcher: agent,
      });
      // Replaced by a fresh id of the server's own (a UUIDv7), not cleaned up: "bad" is no
      // test of that, since b, a and d are hex digits and a random id holds them by chance.
      expect(replaced.headers.get("x-request-id")).toMatch(
        /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/,
      );
      await ts.app.storage.close();
      const down = await undiciFetch(`${ts.server.url}/ready`, { dispatcher: agent });
      expect(down.status).toBe(503);
      expect(((await down.json()) as { ok: boolean }).ok).toBe(false);
    } finally {
      await agent.close();
      await ts.server.close(0);
    }
  });
});

describe.each(DATABASES)("Basic authentication for users on $name", (db) => {
  it("accepts the right password, refuses a wrong one, and follows a password change at once", async () => {
    const app = await createTestApp(db);
    try {
      const t = memoryTransport(app);
      const me = await createClient(
        UserService,
        withHeaders(t, { authorization: basic("admin", ADMIN_PASSWORD) }),
      ).getCurrentUser({});
      expect(me.username).toBe("admin");
      // Cached after first use, still correct on the second.
      await createClient(
        UserService,
        withHeaders(t, { authorization: basic("admin", ADMIN_PASSWORD) }),
      ).getCurrentUser({});
      const wrong = await rejection(
        createClient(UserService, withHeaders(t, { authorization: basic("admin", "nope") })).getCurrentUser(
          {},
        ),
      );
      expect(wrong.reason).toBe("CREDENTIALS_INVALID");
      const unknown = await rejection(
        createClient(UserService, withHeaders(t, { authorization: basic("ghost", "nope") })).getCurrentUser(
          {},
        ),
      );
      expect(unknown.reason).toBe("CREDENTIALS_INVALID");
      expect(unknown.message).toBe(wrong.message);
      await createClient(
        UserService,
        withHeaders(t, { authorization: basic("admin", ADMIN_PASSWORD) }),
      ).changePassword({
        currentPassword: ADMIN_PASSWORD,
        newPassword: "a brand new admin password",
      });
      const stale = await rejection(
        createClient(
          UserService,
          withHeaders(t, { authorization: basic("admin", ADMIN_PASSWORD) }),
        ).getCurrentUser({}),
      );
      expect(stale.reason).toBe("CREDENTIALS_INVALID");
    } finally {
      await app.close();
    }
  });

  it("can be switched off", async () => {
    const app = await createTestApp(db, { auth: { basic: { enabled: false } } });
    try {
      const r = await rejection(
        createClient(
          UserService,
          withHeaders(memoryTransport(app), { authorization: basic("admin", ADMIN_PASSWORD) }),
        ).getCurrentUser({}),
      );
      expect(r.code).toBe(Code.Unauthenticated);
    } finally {
      await app.close();
    }
  });
});

describe.each(DATABASES)("audit log on $name", (db) => {
  it("records logins and admin changes with actor and outcome, and never a secret", async () => {
    const app = await createTestApp(db);
    try {
      const anon = clientFor(UserService, memoryTransport(app));
      await rejection(anon.login({ username: "admin", password: "a wrong password here" }));
      const login = await anon.login({ username: "admin", password: ADMIN_PASSWORD });
      const created = await clientFor(UserService, memoryTransport(app), login.accessToken).createUser({
        username: "audited-user",
        password: "secret password 123",
      });
      await app.audit.flush();
      const rows = await app.sql.all<Record<string, unknown>>("select * from audit_events order by at");
      const actions = rows.map((r) => `${r.action}:${r.outcome}`);
      expect(actions).toContain("tessera.v1.UserService/Login:failure");
      expect(actions).toContain("tessera.v1.UserService/Login:success");
      const create = rows.find((r) => r.action === "tessera.v1.UserService/CreateUser");
      expect(create?.actor_id).toBe(login.user!.id);
      expect(create?.outcome).toBe("success");
      const dump = JSON.stringify(rows);
      for (const secret of [
        ADMIN_PASSWORD,
        "a wrong password here",
        "secret password 123",
        login.accessToken,
        login.refreshToken,
      ])
        expect(dump).not.toContain(secret);
      expect(created.user?.username).toBe("audited-user");
    } finally {
      await app.close();
    }
  });
});

describe("headers on every answer", () => {
  it("carry the request id, the security headers and CORS, whichever path answers an RPC over HTTP/2", async () => {
    const origin = "https://app.example.com";
    const ts = await startTestServer(SQLITE, { cors: { allowedOrigins: [origin] } });
    const session = http2.connect(ts.server.url, { ca: ts.certs.ca });
    session.on("error", () => undefined);
    const call = (path: string, headers: http2.OutgoingHttpHeaders, body: Uint8Array) =>
      new Promise<{
        status: number;
        headers: http2.IncomingHttpHeaders;
        trailers: http2.IncomingHttpHeaders;
      }>((resolve, reject) => {
        const stream = session.request({ ":method": "POST", ":path": path, origin, ...headers });
        let head: http2.IncomingHttpHeaders = {};
        let trailers: http2.IncomingHttpHeaders = {};
        stream.on("response", (h) => (head = h));
        stream.on("trailers", (t) => (trailers = t));
        stream.on("data", () => undefined);
        stream.on("error", reject);
        stream.on("end", () => resolve({ status: Number(head[":status"]), headers: head, trailers }));
        stream.end(body);
      });
    const json = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
    const grpcEmpty = new Uint8Array(5);
    const asJson = { "content-type": "application/json" };
    const asGrpc = { "content-type": "application/grpc", te: "trailers" };
    try {
      const admin = await createClient(UserService, ts.connect()).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const bearer = { authorization: `Bearer ${admin.accessToken}` };
      const cases: [string, string, http2.OutgoingHttpHeaders, Uint8Array, number, string | undefined][] = [
        // [request id, path, headers, body, HTTP status, grpc-status]
        [
          "plain-json",
          "/tessera.v1.UserService/GetCurrentUser",
          { ...asJson, ...bearer },
          json({}),
          200,
          undefined,
        ],
        [
          "plain-grpc",
          "/tessera.v1.UserService/GetCurrentUser",
          { ...asGrpc, ...bearer },
          grpcEmpty,
          200,
          "0",
        ],
        [
          "error-json",
          "/tessera.v1.UserService/GetUser",
          { ...asJson, ...bearer },
          json({ id: "nope" }),
          404,
          undefined,
        ],
        [
          // An empty DATA frame ends the stream: Node reads it to its "end" at once, before
          // the credential is checked and the body read.
          "empty-body",
          "/tessera.v1.UserService/GetCurrentUser",
          { "content-type": "application/proto", ...bearer },
          new Uint8Array(0),
          200,
          undefined,
        ],
        ["error-grpc", "/tessera.v1.UserService/GetUser", { ...asGrpc, ...bearer }, grpcEmpty, 200, "3"],
        [
          "refused",
          "/tessera.v1.UserService/GetCurrentUser",
          { ...asJson, authorization: "Bearer x" },
          json({}),
          401,
          undefined,
        ],
        ["unknown-path", "/tessera.v1.Nope/Nope", asJson, json({}), 404, undefined],
        [
          // Left to Connect's own handler, which refuses this content type.
          "connect-handler",
          "/tessera.v1.UserService/GetCurrentUser",
          { ...asGrpc, "content-type": "application/grpc-web-text", ...bearer },
          new TextEncoder().encode(Buffer.from(grpcEmpty).toString("base64")),
          415,
          undefined,
        ],
      ];
      for (const [id, path, headers, body, status, grpcStatus] of cases) {
        const answer = await call(path, { ...headers, "x-request-id": id }, body);
        expect([id, answer.status]).toEqual([id, status]);
        if (grpcStatus !== undefined) expect([id, answer.trailers["grpc-status"]]).toEqual([id, grpcStatus]);
        expect([id, answer.headers["x-request-id"]]).toEqual([id, id]);
        expect([id, answer.headers["x-content-type-options"]]).toEqual([id, "nosniff"]);
        expect([id, answer.headers["x-frame-options"]]).toEqual([id, "DENY"]);
        expect([id, answer.headers["content-security-policy"]]).toEqual([id, "default-src 'self'"]);
        expect([id, answer.headers["strict-transport-security"]]).toEqual([
          id,
          "max-age=31536000; includeSubDomains",
        ]);
        expect([id, answer.headers["access-control-allow-origin"]]).toEqual([id, origin]);
        expect([id, answer.headers["access-control-expose-headers"]]).toEqual([
          id,
          expect.stringContaining("X-Request-Id"),
        ]);
      }
    } finally {
      session.close();
      await ts.close();
    }
  });
});
