import { execFile } from "node:child_process";
import { connect as tlsConnect } from "node:tls";
import { promisify } from "node:util";
import { createClient } from "@connectrpc/connect";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { Code, rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  createTestCerts,
  DATABASES,
  SQLITE,
  startTestServer,
  type TestServer,
  withHeaders,
} from "./helpers.js";

const execFileAsync = promisify(execFile);

describe.each(DATABASES)("real server over TLS on $name", (db) => {
  let ts: TestServer;
  let agent: Agent;
  let mtlsAgent: Agent;
  const post = (path: string, body: unknown, headers: Record<string, string> = {}, dispatcher = agent) =>
    undiciFetch(`${ts.server.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(body),
      dispatcher,
    });

  beforeAll(async () => {
    ts = await startTestServer(db);
    agent = new Agent({ connect: { ca: ts.certs.ca } });
    mtlsAgent = new Agent({
      connect: { ca: ts.certs.ca, cert: ts.certs.clientCert, key: ts.certs.clientKey },
    });
  });
  afterAll(async () => {
    await agent.close();
    await mtlsAgent.close();
    await ts.close();
  });

  it("answers GET /health with the envelope, security headers and a request id", async () => {
    const res = await undiciFetch(`${ts.server.url}/health`, { dispatcher: agent });
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      ok: boolean;
      data: { status: string; version: string; uptime: number };
    };
    expect(body.ok).toBe(true);
    expect(body.data.status).toBe("healthy");
    expect(typeof body.data.version).toBe("string");
    expect(typeof body.data.uptime).toBe("number");
    expect(res.headers.get("x-request-id")).toMatch(/^[0-9a-f-]{36}$/);
    expect(res.headers.get("x-content-type-options")).toBe("nosniff");
    expect(res.headers.get("x-frame-options")).toBe("DENY");
    expect(res.headers.get("x-xss-protection")).toBe("1; mode=block");
    expect(res.headers.get("strict-transport-security")).toBe("max-age=31536000; includeSubDomains");
    expect(res.headers.get("content-security-policy")).toBe("default-src 'self'");
  });

  it("answers GET /ready while the database is up", async () => {
    const res = await undiciFetch(`${ts.server.url}/ready`, { dispatcher: agent });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { ok: boolean }).ok).toBe(true);
  });

  it("logs in and calls GetCurrentUser with Connect JSON over plain fetch", async () => {
    const login = await post("/tessera.v1.UserService/Login", {
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    expect(login.status).toBe(200);
    const { accessToken } = (await login.json()) as { accessToken: string };
    const me = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Bearer ${accessToken}` },
    );
    expect(me.status).toBe(200);
    const body = (await me.json()) as {
      username: string;
      permissions: string[];
      clientCertificate?: unknown;
    };
    expect(body.username).toBe("admin");
    expect(body.permissions).toEqual(["*"]);
    expect(body.clientCertificate).toBeUndefined();
  });

  it("passes a verified client certificate's identity to the principal in optional mode", async () => {
    const login = await post(
      "/tessera.v1.UserService/Login",
      { username: "admin", password: ADMIN_PASSWORD },
      {},
      mtlsAgent,
    );
    const { accessToken } = (await login.json()) as { accessToken: string };
    const me = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Bearer ${accessToken}` },
      mtlsAgent,
    );
    const body = (await me.json()) as {
      clientCertificate: { sha256Fingerprint: string; commonName: string };
    };
    expect(body.clientCertificate.commonName).toBe("test-client");
    expect(body.clientCertificate.sha256Fingerprint).toBe(ts.certs.clientFingerprint);
  });

  it("answers 401 with WWW-Authenticate and a JSON error body that never echoes the token", async () => {
    const none = await post("/tessera.v1.UserService/GetCurrentUser", {});
    expect(none.status).toBe(401);
    expect(none.headers.get("www-authenticate")).toBe('Bearer realm="tessera"');
    const noneBody = (await none.json()) as {
      code: string;
      details: {
        type: string;
        debug?: { reason: string; domain: string; metadata?: Record<string, string> };
      }[];
    };
    expect(noneBody.code).toBe("unauthenticated");
    expect(noneBody.details[0]?.type).toBe("google.rpc.ErrorInfo");
    expect(noneBody.details[0]?.debug?.domain).toBe("tessera.dev");
    expect(noneBody.details[0]?.debug?.reason).toBe("AUTH_REQUIRED");
    expect(noneBody.details[0]?.debug?.metadata?.request_id).toBe(none.headers.get("x-request-id"));
    // The seeds' envelope fields beside Connect's own.
    expect(noneBody).toMatchObject({
      ok: false,
      error: "Unauthorized",
      reason: "AUTH_REQUIRED",
      message: "Authentication required",
      request_id: none.headers.get("x-request-id"),
    });

    const secret = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXRoYXQtaXMtd3Jvbmc";
    const bad = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Bearer ${secret}` },
    );
    expect(bad.status).toBe(401);
    expect(bad.headers.get("www-authenticate")).toContain('error="invalid_token"');
    const text = await bad.text();
    expect(text).not.toContain(secret);
    expect(JSON.parse(text).details[0].debug.reason).toBe("TOKEN_INVALID");
  });

  it("answers 403 for a missing scope and 400 for two credentials", async () => {
    const login = await post("/tessera.v1.UserService/Login", {
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const { accessToken } = (await login.json()) as { accessToken: string };
    await post(
      "/tessera.v1.UserService/CreateUser",
      { username: "reader-e2e", password: "long enough password", scopes: ["cluster:read"] },
      { authorization: `Bearer ${accessToken}` },
    );
    const readerLogin = await post("/tessera.v1.UserService/Login", {
      username: "reader-e2e",
      password: "long enough password",
    });
    const reader = ((await readerLogin.json()) as { accessToken: string }).accessToken;
    const denied = await post("/tessera.v1.UserService/ListUsers", {}, { authorization: `Bearer ${reader}` });
    expect(denied.status).toBe(403);
    expect(await denied.clone().json()).toMatchObject({
      ok: false,
      error: "Forbidden",
      code: "permission_denied",
      reason: "ACCESS_DENIED",
      message: "Insufficient permissions",
    });
    expect(denied.headers.get("www-authenticate")).toContain("insufficient_scope");
    const both = await post(
      "/tessera.v1.UserService/GetCurrentUser",
      {},
      { authorization: `Bearer ${reader}`, "x-api-key": "tsr_key_x" },
    );
    expect(both.status).toBe(400);
  });

  it("serves the same API over gRPC and answers the standard health service", async () => {
    const grpc = ts.grpc();
    const users = createClient(UserService, grpc);
    const login = await users.login({ username: "admin", password: ADMIN_PASSWORD });
    const me = await createClient(
      UserService,
      withHeaders(grpc, { authorization: `Bearer ${login.accessToken}` }),
    ).getCurrentUser({});
    expect(me.username).toBe("admin");
    const health = await createClient(Health, grpc).check({ service: "" });
    expect(health.status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    expect((await rejection(createClient(Health, grpc).check({ service: "no.such.Service" }))).code).toBe(
      Code.NotFound,
    );
    const r = await rejection(users.getCurrentUser({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.error.metadata.get("www-authenticate")).toBe('Bearer realm="tessera"');
  });

  it("serves gRPC-Web", async () => {
    const { createGrpcWebTransport } = await import("@connectrpc/connect-node");
    const web = createGrpcWebTransport({
      baseUrl: ts.server.url,
      httpVersion: "1.1",
      nodeOptions: { ca: ts.certs.ca },
    });
    const login = await createClient(UserService, web).login({ username: "admin", password: ADMIN_PASSWORD });
    expect(login.accessToken).toBeTruthy();
  });
});

describe("mTLS modes and tooling", () => {
  it("fails the handshake without a client certificate in require mode, and serves one that has it", async () => {
    const ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
    try {
      const refused = await rejection(
        createClient(UserService, ts.connect()).login({ username: "admin", password: ADMIN_PASSWORD }),
      );
      expect([Code.Unavailable, Code.Unknown, Code.Internal]).toContain(refused.code);
      const ok = await createClient(UserService, ts.connect({ clientCert: true })).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      expect(ok.accessToken).toBeTruthy();
    } finally {
      await ts.close();
    }
  });

  it("refuses a certificate from another CA at the handshake in require mode", async () => {
    const ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
    const foreign = await createTestCerts("intruder");
    try {
      const err = await new Promise<Error | null>((resolve) => {
        const socket = tlsConnect({
          host: "127.0.0.1",
          port: ts.server.port,
          ca: ts.certs.ca,
          cert: foreign.clientCert,
          key: foreign.clientKey,
          ALPNProtocols: ["h2"],
        });
        socket.once("secureConnect", () => {
          // TLS 1.3 reports the server's refusal after the handshake completes on the client side.
          socket.once("error", (e) => resolve(e));
          socket.once("close", () => resolve(new Error("closed")));
          socket.write("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        });
        socket.once("error", (e) => resolve(e));
      });
      expect(err).not.toBeNull();
    } finally {
      await ts.close();
    }
  });

  it("lets buf curl discover the API by reflection and log in over gRPC", async () => {
    const ts = await startTestServer(SQLITE);
    try {
      const { stdout } = await execFileAsync("node_modules/.bin/buf", [
        "curl",
        "--protocol",
        "grpc",
        "--reflect",
        "--cacert",
        `${ts.certs.dir}/ca.crt`,
        "-d",
        JSON.stringify({ username: "admin", password: ADMIN_PASSWORD }),
        `${ts.server.url}/tessera.v1.UserService/Login`,
      ]);
      expect(JSON.parse(stdout).accessToken).toBeTruthy();
      const list = await execFileAsync("node_modules/.bin/buf", [
        "curl",
        "--protocol",
        "grpc",
        "--reflect",
        "--cacert",
        `${ts.certs.dir}/ca.crt`,
        "--list-methods",
        ts.server.url,
      ]);
      expect(list.stdout).toContain("tessera.v1.UserService/GetCurrentUser");
      // With a client certificate, as the README shows: the server names it in the answer.
      const me = await execFileAsync("node_modules/.bin/buf", [
        "curl",
        "--protocol",
        "grpc",
        "--reflect",
        "--cacert",
        `${ts.certs.dir}/ca.crt`,
        "--cert",
        `${ts.certs.clientDir}/client.crt`,
        "--key",
        `${ts.certs.clientDir}/client.key`,
        "-H",
        `authorization: Bearer ${JSON.parse(stdout).accessToken}`,
        `${ts.server.url}/tessera.v1.UserService/GetCurrentUser`,
      ]);
      expect(JSON.parse(me.stdout).clientCertificate.commonName).toBe("test-client");
    } finally {
      await ts.close();
    }
  });
});
