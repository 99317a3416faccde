import http2 from "node:http2";
import { decodeJwt } from "jose";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../gen/tessera/v1/audit_service_pb.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { startServer } from "../src/server.js";
import { rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestCerts,
  DATABASES,
  memoryTransport,
  SQLITE,
  startTestServer,
  type TestServer,
} from "./helpers.js";
import { adminLogin, clients, short, tenantWithAdmin, tlsAgents } from "./machine-fixtures.js";
import { type OutageApp, startOutageApp } from "./outage-helpers.js";

/** An answer of an OAuth endpoint. */
interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  json: Record<string, unknown>;
}

/** `Authorization: Basic` as RFC 6749 §2.3.1 builds it: each part form-urlencoded first. */
function clientSecretBasic(id: string, secret: string): Record<string, string> {
  const enc = (s: string) =>
    encodeURIComponent(s).replace(/[-_.!~*'()]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  return { authorization: `Basic ${Buffer.from(`${enc(id)}:${enc(secret)}`).toString("base64")}` };
}

for (const db of DATABASES) {
  describe(`OAuth 2.0 endpoints over TLS (${db.name})`, () => {
    let ts: TestServer;
    let agent: Agent;
    let certAgent: Agent;
    let rootToken: string;
    let tenant: Awaited<ReturnType<typeof tenantWithAdmin>>;
    /** A Basic machine user of `tenant` holding cluster:read cluster:write. */
    let mu: { id: string; username: string; password: string };

    beforeAll(async () => {
      ts = await startTestServer(db);
      ({ agent, certAgent } = tlsAgents(ts));
      const mem = memoryTransport(ts.app);
      rootToken = await adminLogin(mem);
      tenant = await tenantWithAdmin(mem, rootToken, ["admin:tenants", "admin:machine-users", "cluster:*"]);
      mu = await basicMachineWith(tenant.token, ["cluster:read", "cluster:write"]);
    });
    afterAll(async () => {
      await agent?.close();
      await certAgent?.close();
      await ts?.close();
    });

    async function basicMachineWith(adminToken: string, scopes: string[], tenantId?: string) {
      const res = await clients(memoryTransport(ts.app), adminToken).machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BASIC,
        applicationIds: [],
        scopes,
        ...(tenantId ? { tenantId } : {}),
      });
      return { id: res.machineUser!.id, username: res.username, password: res.password };
    }

    async function call(
      path: string,
      body: string | Record<string, string>,
      opts: { headers?: Record<string, string>; cert?: boolean; method?: "GET" | "POST" } = {},
    ): Promise<Answer> {
      const text = typeof body === "string" ? body : new URLSearchParams(body).toString();
      const res = await request(`${ts.server.url}${path}`, {
        method: opts.method ?? "POST",
        dispatcher: opts.cert ? certAgent : agent,
        headers: { "content-type": "application/x-www-form-urlencoded", ...opts.headers },
        ...(opts.method === "GET" ? {} : { body: text }),
      });
      const raw = await res.body.text();
      return { status: res.statusCode, headers: res.headers, json: raw ? JSON.parse(raw) : {} };
    }

    const token = (body: Record<string, string> | string, opts?: Parameters<typeof call>[2]) =>
      call("/oauth2/token", body, opts);
    const revoke = (body: Record<string, string>, opts?: Parameters<typeof call>[2]) =>
      call("/oauth2/revoke", body, opts);

    /** Whether a machine access token is accepted by an RPC over TLS now (with the client certificate when asked). */
    async function machineTokenWorks(accessToken: string, cert = false) {
      try {
        await clients(ts.connect({ clientCert: cert }), accessToken).machines.checkAuthentication({});
        return "ok";
      } catch (err) {
        return (await rejection(Promise.reject(err))).reason;
      }
    }

    it("serves the discovery document (RFC 8414) with the endpoints and methods", async () => {
      const res = await call("/.well-known/oauth-authorization-server", "", { method: "GET" });
      expect(res.status).toBe(200);
      const issuer = ts.server.url;
      expect(res.json).toMatchObject({
        issuer,
        token_endpoint: `${issuer}/oauth2/token`,
        jwks_uri: `${issuer}/.well-known/jwks.json`,
        revocation_endpoint: `${issuer}/oauth2/revoke`,
        introspection_endpoint: `${issuer}/oauth2/introspect`,
        grant_types_supported: ["client_credentials", "refresh_token"],
        // none: a user's session refreshes, and revokes its refresh token, as a public client.
        token_endpoint_auth_methods_supported: [
          "client_secret_basic",
          "client_secret_post",
          "tls_client_auth",
          "none",
        ],
        revocation_endpoint_auth_methods_supported: [
          "client_secret_basic",
          "client_secret_post",
          "tls_client_auth",
          "none",
        ],
        // Introspection takes a bearer (RFC 8414 §2: an access token type may be named there), never none.
        introspection_endpoint_auth_methods_supported: [
          "client_secret_basic",
          "client_secret_post",
          "tls_client_auth",
          "Bearer",
        ],
        tls_client_certificate_bound_access_tokens: true,
      });
      expect(res.headers["x-request-id"]).toBeTruthy();
    });

    it("serves the token endpoint over HTTP/2 as well", async () => {
      const session = http2.connect(ts.server.url, { ca: ts.certs.ca });
      try {
        const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
          const stream = session.request({
            ":method": "POST",
            ":path": "/oauth2/token",
            "content-type": "application/x-www-form-urlencoded",
            ...clientSecretBasic(mu.username, mu.password),
          });
          let status = 0;
          let body = "";
          stream.on("response", (h) => {
            status = Number(h[":status"]);
          });
          stream.setEncoding("utf8");
          stream.on("data", (c: string) => {
            body += c;
          });
          stream.on("end", () => resolve({ status, body }));
          stream.on("error", reject);
          stream.end("grant_type=client_credentials&scope=cluster%3Aread");
        });
        expect(answer.status).toBe(200);
        expect(JSON.parse(answer.body).scope).toBe("cluster:read");
      } finally {
        session.close();
      }
    });

    describe("client_credentials", () => {
      it("issues a machine access token to client_secret_basic, with no-store and the machine user's scopes", async () => {
        const res = await token(
          { grant_type: "client_credentials" },
          { headers: clientSecretBasic(mu.username, mu.password) },
        );
        expect(res.status).toBe(200);
        expect(res.headers["cache-control"]).toBe("no-store");
        expect(res.json.token_type).toBe("Bearer");
        expect(res.json.scope).toBe("cluster:read cluster:write");
        expect(res.json.expires_in).toBeGreaterThan(800);
        expect(res.json.refresh_token).toBeUndefined();
        const claims = decodeJwt(res.json.access_token as string);
        expect(claims.sub).toBe(mu.id);
        expect(claims.tid).toBe(tenant.tenant.id);
        expect(claims.cnf).toBeUndefined();
        expect(await machineTokenWorks(res.json.access_token as string)).toBe("ok");
      });

      it("accepts a plain (not form-urlencoded) Basic pair too, as curl -u sends it", async () => {
        const plain = {
          authorization: `Basic ${Buffer.from(`${mu.username}:${mu.password}`).toString("base64")}`,
        };
        const res = await token({ grant_type: "client_credentials" }, { headers: plain });
        expect(res.status).toBe(200);
      });

      it("issues to client_secret_post", async () => {
        const res = await token({
          grant_type: "client_credentials",
          client_id: mu.username,
          client_secret: mu.password,
        });
        expect(res.status).toBe(200);
        expect(await machineTokenWorks(res.json.access_token as string)).toBe("ok");
      });

      it("issues a certificate-bound token to tls_client_auth (RFC 8705), refused without that certificate", async () => {
        const certMu = await basicMachineWith(tenant.token, ["cluster:read"]);
        await clients(memoryTransport(ts.app), tenant.token).machines.bindCertificate({
          machineUserId: certMu.id,
          identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
        });
        try {
          const res = await token({ grant_type: "client_credentials", client_id: certMu.id }, { cert: true });
          expect(res.status).toBe(200);
          const claims = decodeJwt(res.json.access_token as string) as {
            sub: string;
            cnf?: Record<string, string>;
          };
          expect(claims.sub).toBe(certMu.id);
          expect(claims.cnf?.["x5t#S256"]).toBeTruthy();
          expect(await machineTokenWorks(res.json.access_token as string, true)).toBe("ok");
          expect(await machineTokenWorks(res.json.access_token as string, false)).toBe("TOKEN_NOT_BOUND");
          // client_id is optional with a certificate; one naming another machine user is refused.
          expect((await token({ grant_type: "client_credentials" }, { cert: true })).status).toBe(200);
          const other = await token({ grant_type: "client_credentials", client_id: mu.id }, { cert: true });
          expect(other.status).toBe(401);
          expect(other.json.error).toBe("invalid_client");
        } finally {
          await clients(memoryTransport(ts.app), tenant.token).machines.unbindCertificate({
            machineUserId: certMu.id,
            identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
          });
        }
      });

      it("narrows to a requested scope, and refuses a scope the machine user does not hold (invalid_scope)", async () => {
        const auth = { headers: clientSecretBasic(mu.username, mu.password) };
        const narrow = await token({ grant_type: "client_credentials", scope: "cluster:read" }, auth);
        expect(narrow.status).toBe(200);
        expect(narrow.json.scope).toBe("cluster:read");
        expect(decodeJwt(narrow.json.access_token as string).scope).toBe("cluster:read");
        for (const scope of ["cluster:read admin:users", "*", "cluster:*", "not a scope!"]) {
          const wide = await token({ grant_type: "client_credentials", scope }, auth);
          expect(wide.status, scope).toBe(400);
          expect(wide.json.error, scope).toBe("invalid_scope");
        }
      });

      it("answers invalid_client (401, WWW-Authenticate) for a wrong secret, an unknown client, none, or a bearer", async () => {
        const cases: Answer[] = [
          await token(
            { grant_type: "client_credentials" },
            { headers: clientSecretBasic(mu.username, "wrong") },
          ),
          await token({
            grant_type: "client_credentials",
            client_id: "mu_unknownunknown",
            client_secret: "x",
          }),
          await token({ grant_type: "client_credentials" }),
          await token(
            { grant_type: "client_credentials" },
            { headers: { authorization: `Bearer ${rootToken}` } },
          ),
          await token({ grant_type: "client_credentials" }, { headers: { authorization: "Basic !!!" } }),
        ];
        for (const res of cases) {
          expect(res.status).toBe(401);
          expect(res.json.error).toBe("invalid_client");
          expect(res.headers["www-authenticate"]).toBe('Basic realm="tessera"');
          expect(JSON.stringify(res.json)).not.toContain(mu.password);
        }
        // The same answer for a wrong secret and an unknown client.
        expect(cases[0]!.json).toEqual(cases[1]!.json);
      });

      it("answers unauthorized_client to a user's credentials", async () => {
        const res = await token(
          { grant_type: "client_credentials" },
          { headers: clientSecretBasic("admin", "admin-password-for-tests") },
        );
        expect(res.status).toBe(400);
        expect(res.json.error).toBe("unauthorized_client");
      });

      it("answers invalid_request and unsupported_grant_type for malformed requests", async () => {
        const auth = { headers: clientSecretBasic(mu.username, mu.password) };
        const expectError = (res: Answer, error: string, status = 400) => {
          expect(res.json.error).toBe(error);
          expect(res.status).toBe(status);
          expect(res.headers["cache-control"]).toBe("no-store");
        };
        expectError(await token({}, auth), "invalid_request");
        expectError(await token({ grant_type: "password" }, auth), "unsupported_grant_type");
        expectError(await token({ grant_type: "authorization_code" }), "unsupported_grant_type");
        expectError(
          await token("grant_type=client_credentials&grant_type=client_credentials", auth),
          "invalid_request",
        );
        expectError(await token("grant_type=client_credentials&scope=a&scope=b", auth), "invalid_request");
        expectError(
          await token(JSON.stringify({ grant_type: "client_credentials" }), {
            headers: { ...auth.headers, "content-type": "application/json" },
          }),
          "invalid_request",
        );
        expectError(
          await token(`grant_type=client_credentials&pad=${"x".repeat(200 * 1024)}`, auth),
          "invalid_request",
          413,
        );
        expectError(await token("grant_type=client_credentials%00", auth), "invalid_request");
        expectError(
          await token(
            { grant_type: "client_credentials", client_secret: mu.password, client_id: mu.username },
            auth,
          ),
          "invalid_request",
        );
        const get = await token("", { method: "GET" });
        expect(get.status).toBe(405);
        expect(get.headers.allow).toBe("POST");
      });
    });

    describe("refresh_token", () => {
      async function userSession(scopes = ["cluster:read", "cluster:write"]) {
        const username = `u-${short()}`;
        await clients(memoryTransport(ts.app), rootToken).users.createUser({
          username,
          password: "a user password for tests",
          scopes,
          tenantId: tenant.tenant.id,
        });
        const login = await clientFor(UserService, memoryTransport(ts.app)).login({
          username,
          password: "a user password for tests",
          tenant: tenant.tenant.id,
        });
        return login;
      }

      it("rotates the session's refresh token (public client: a client_id alone is ignored)", async () => {
        const login = await userSession();
        const res = await token({
          grant_type: "refresh_token",
          refresh_token: login.refreshToken,
          client_id: "cli",
        });
        expect(res.status).toBe(200);
        expect(res.json.token_type).toBe("Bearer");
        expect(res.json.refresh_token).toMatch(/^tsr_rt_/);
        expect(res.json.refresh_token).not.toBe(login.refreshToken);
        expect(res.json.scope).toBe("cluster:read cluster:write");
        const me = await clientFor(UserService, ts.connect(), res.json.access_token as string).getCurrentUser(
          {},
        );
        expect(me.id).toBe(login.user!.id);
      });

      it("detects reuse: a spent refresh token is invalid_grant and ends the session for both holders", async () => {
        const login = await userSession();
        const first = await token({ grant_type: "refresh_token", refresh_token: login.refreshToken });
        expect(first.status).toBe(200);
        const reuse = await token({ grant_type: "refresh_token", refresh_token: login.refreshToken });
        expect(reuse.status).toBe(400);
        expect(reuse.json.error).toBe("invalid_grant");
        const next = await token({
          grant_type: "refresh_token",
          refresh_token: first.json.refresh_token as string,
        });
        expect(next.json.error).toBe("invalid_grant");
        const refused = await rejection(
          clientFor(UserService, ts.connect(), first.json.access_token as string).getCurrentUser({}),
        );
        expect(refused.reason).toBe("TOKEN_REVOKED");
      });

      it("narrows the new access token's scope, and refuses widening without spending the token", async () => {
        const login = await userSession();
        const wide = await token({
          grant_type: "refresh_token",
          refresh_token: login.refreshToken,
          scope: "admin:users",
        });
        expect(wide.status).toBe(400);
        expect(wide.json.error).toBe("invalid_scope");
        const narrow = await token({
          grant_type: "refresh_token",
          refresh_token: login.refreshToken,
          scope: "cluster:read",
        });
        expect(narrow.status).toBe(200);
        expect(narrow.json.scope).toBe("cluster:read");
        expect(decodeJwt(narrow.json.access_token as string).scope).toBe("cluster:read");
      });

      it("answers invalid_grant for unknown tokens and invalid_request without one", async () => {
        expect((await token({ grant_type: "refresh_token", refresh_token: "tsr_rt_nope" })).json.error).toBe(
          "invalid_grant",
        );
        expect((await token({ grant_type: "refresh_token", refresh_token: "nonsense" })).json.error).toBe(
          "invalid_grant",
        );
        expect((await token({ grant_type: "refresh_token" })).json.error).toBe("invalid_request");
      });

      it("refuses a refresh token to an authenticated client that is not its user (as an unknown one)", async () => {
        const login = await userSession();
        const res = await token(
          { grant_type: "refresh_token", refresh_token: login.refreshToken },
          { headers: clientSecretBasic(mu.username, mu.password) },
        );
        expect(res.status).toBe(400);
        expect(res.json).toEqual(
          (await token({ grant_type: "refresh_token", refresh_token: "tsr_rt_nope" })).json,
        );
        // Not spent by the refusal.
        expect((await token({ grant_type: "refresh_token", refresh_token: login.refreshToken })).status).toBe(
          200,
        );
      });
    });

    describe("revocation (RFC 7009)", () => {
      it("revokes the machine user's access tokens with client authentication: refused on the next call, its credentials kept", async () => {
        const own = await basicMachineWith(tenant.token, ["cluster:read"]);
        const auth = { headers: clientSecretBasic(own.username, own.password) };
        const issued = await token({ grant_type: "client_credentials" }, auth);
        const at = issued.json.access_token as string;
        expect(await machineTokenWorks(at)).toBe("ok");
        const res = await revoke({ token: at, token_type_hint: "access_token" }, auth);
        expect(res.status).toBe(200);
        expect(res.headers["cache-control"]).toBe("no-store");
        expect(await machineTokenWorks(at)).toBe("TOKEN_REVOKED");
        // The client is not locked out: a new token works.
        const again = await token({ grant_type: "client_credentials" }, auth);
        expect(again.status).toBe(200);
        expect(await machineTokenWorks(again.json.access_token as string)).toBe("ok");
      });

      it("revokes a user's refresh token (its session) and personal access token with a bearer", async () => {
        const username = `r-${short()}`;
        await clients(memoryTransport(ts.app), rootToken).users.createUser({
          username,
          password: "a user password for tests",
          scopes: ["cluster:read"],
          tenantId: tenant.tenant.id,
        });
        const login = await clientFor(UserService, memoryTransport(ts.app)).login({
          username,
          password: "a user password for tests",
          tenant: tenant.tenant.id,
        });
        const pat = await clientFor(
          TokenService,
          memoryTransport(ts.app),
          login.accessToken,
        ).createPersonalAccessToken({
          name: "ci",
        });
        const bearer = { headers: { authorization: `Bearer ${pat.token}` } };
        expect(
          (await revoke({ token: login.refreshToken, token_type_hint: "refresh_token" }, bearer)).status,
        ).toBe(200);
        expect(
          (await token({ grant_type: "refresh_token", refresh_token: login.refreshToken })).json.error,
        ).toBe("invalid_grant");
        expect(
          (await rejection(clientFor(UserService, ts.connect(), login.accessToken).getCurrentUser({})))
            .reason,
        ).toBe("TOKEN_REVOKED");
        // Revoking the very token it authenticates with.
        expect((await revoke({ token: pat.token }, bearer)).status).toBe(200);
        expect(
          (await rejection(clientFor(UserService, ts.connect(), pat.token).getCurrentUser({}))).reason,
        ).toBe("TOKEN_REVOKED");
      });

      it("revokes a user's access token by ending its session", async () => {
        const login = await clientFor(UserService, memoryTransport(ts.app)).login({
          username: tenant.username,
          password: "tenant admin password",
          tenant: tenant.tenant.id,
        });
        const res = await revoke(
          { token: login.accessToken },
          { headers: { authorization: `Bearer ${login.accessToken}` } },
        );
        expect(res.status).toBe(200);
        expect(
          (await rejection(clientFor(UserService, ts.connect(), login.accessToken).getCurrentUser({})))
            .reason,
        ).toBe("TOKEN_REVOKED");
      });

      it("answers 200 and revokes nothing for unknown tokens and another principal's or another tenant's", async () => {
        const other = await tenantWithAdmin(memoryTransport(ts.app), rootToken);
        const foreign = await basicMachineWith(other.token, []);
        const foreignToken = (
          await token(
            { grant_type: "client_credentials" },
            { headers: clientSecretBasic(foreign.username, foreign.password) },
          )
        ).json.access_token as string;
        const sameTenant = await basicMachineWith(tenant.token, []);
        const neighbourToken = (
          await token(
            { grant_type: "client_credentials" },
            { headers: clientSecretBasic(sameTenant.username, sameTenant.password) },
          )
        ).json.access_token as string;
        const auth = { headers: clientSecretBasic(mu.username, mu.password) };
        const answers = [
          await revoke({ token: foreignToken }, auth),
          await revoke({ token: neighbourToken }, auth),
          await revoke({ token: "not-a-token" }, auth),
          await revoke({ token: "tsr_rt_unknown", token_type_hint: "refresh_token" }, auth),
          await revoke({ token: other.token }, auth),
        ];
        for (const a of answers) {
          expect(a.status).toBe(200);
          expect(a.json).toEqual({});
        }
        expect(await machineTokenWorks(foreignToken)).toBe("ok");
        expect(await machineTokenWorks(neighbourToken)).toBe("ok");
        expect((await clientFor(UserService, ts.connect(), other.token).getCurrentUser({})).id).toBeTruthy();
      });

      it("revokes with client_secret_post: the machine user's access tokens end, a wrong secret is invalid_client", async () => {
        const own = await basicMachineWith(tenant.token, ["cluster:read"]);
        const post = { client_id: own.username, client_secret: own.password };
        const at = (await token({ grant_type: "client_credentials", ...post })).json.access_token as string;
        expect(await machineTokenWorks(at)).toBe("ok");
        const wrong = await revoke({ token: at, client_id: own.username, client_secret: "wrong" });
        expect(wrong.status).toBe(401);
        expect(wrong.json.error).toBe("invalid_client");
        expect(await machineTokenWorks(at)).toBe("ok");
        const res = await revoke({ token: at, token_type_hint: "access_token", ...post });
        expect(res.status).toBe(200);
        expect(res.json).toEqual({});
        expect(await machineTokenWorks(at)).toBe("TOKEN_REVOKED");
      });

      it("revokes with tls_client_auth: the certificate's machine user's bound tokens end", async () => {
        const certMu = await basicMachineWith(tenant.token, ["cluster:read"]);
        const identity = { case: "sha256Fingerprint" as const, value: ts.certs.clientFingerprint };
        const machines = clients(memoryTransport(ts.app), tenant.token).machines;
        await machines.bindCertificate({ machineUserId: certMu.id, identity });
        try {
          const at = (await token({ grant_type: "client_credentials" }, { cert: true })).json
            .access_token as string;
          expect(decodeJwt(at).sub).toBe(certMu.id);
          expect(await machineTokenWorks(at, true)).toBe("ok");
          const res = await revoke({ token: at, client_id: certMu.id }, { cert: true });
          expect(res.status).toBe(200);
          expect(res.json).toEqual({});
          expect(await machineTokenWorks(at, true)).toBe("TOKEN_REVOKED");
          // Without client_id too (RFC 8705 §2: the certificate names the client).
          const again = (await token({ grant_type: "client_credentials" }, { cert: true })).json
            .access_token as string;
          expect((await revoke({ token: again }, { cert: true })).status).toBe(200);
          expect(await machineTokenWorks(again, true)).toBe("TOKEN_REVOKED");
        } finally {
          await machines.unbindCertificate({ machineUserId: certMu.id, identity });
        }
      });

      it("refuses bad client authentication, a missing token, and a machine user's own credential", async () => {
        const bad = await revoke({ token: "x" }, { headers: clientSecretBasic(mu.username, "wrong") });
        expect(bad.status).toBe(401);
        expect(bad.json.error).toBe("invalid_client");
        const none = await revoke({ token: "x" });
        expect(none.status).toBe(401);
        const badBearer = await revoke({ token: "x" }, { headers: { authorization: "Bearer tsr_pat_nope" } });
        expect(badBearer.status).toBe(401);
        expect(badBearer.headers["www-authenticate"]).toContain("Bearer");
        const auth = { headers: clientSecretBasic(mu.username, mu.password) };
        expect((await revoke({}, auth)).json.error).toBe("invalid_request");
        const bearerMu = await clients(memoryTransport(ts.app), tenant.token).machines.createMachineUser({
          name: `mu-${short()}`,
          authType: MachineAuthType.BEARER,
        });
        const own = await revoke(
          { token: bearerMu.token },
          { headers: { authorization: `Bearer ${bearerMu.token}` } },
        );
        expect(own.status).toBe(400);
        expect(own.json.error).toBe("unsupported_token_type");
      });
    });

    it("answers invalid_client (401) at the token, introspection and revocation endpoints to a client certificate bound to no one, to another machine user, or in another tenant", async () => {
      const identity = { case: "sha256Fingerprint" as const, value: ts.certs.clientFingerprint };
      const here = clients(memoryTransport(ts.app), tenant.token).machines;
      const other = await tenantWithAdmin(memoryTransport(ts.app), rootToken);
      const there = clients(memoryTransport(ts.app), other.token).machines;
      // Each holds auth:verify where it may, so that introspection's rule is not what refuses.
      const bound = await basicMachineWith(tenant.token, ["cluster:read"]);
      const named = await basicMachineWith(tenant.token, ["cluster:read"]);
      const foreign = await basicMachineWith(other.token, []);
      /** The three endpoints over the client certificate, the client named by `clientId` when given. */
      const endpoints = async (clientId?: string) => {
        const id: Record<string, string> = clientId === undefined ? {} : { client_id: clientId };
        return {
          token: await token({ grant_type: "client_credentials", ...id }, { cert: true }),
          introspect: await call("/oauth2/introspect", { token: "tsr_pat_nope", ...id }, { cert: true }),
          revoke: await revoke({ token: "tsr_pat_nope", ...id }, { cert: true }),
        };
      };
      const expectInvalidClient = (answers: Record<string, Answer>, label: string) => {
        for (const [endpoint, res] of Object.entries(answers)) {
          expect(res.status, `${label}: ${endpoint}`).toBe(401);
          expect(res.json.error, `${label}: ${endpoint}`).toBe("invalid_client");
          expect(res.headers["www-authenticate"], `${label}: ${endpoint}`).toBeTruthy();
          expect(res.headers["cache-control"], `${label}: ${endpoint}`).toBe("no-store");
        }
      };
      // Bound to no one (a certificate of the server's CA all the same).
      expectInvalidClient(await endpoints(), "unbound");
      expectInvalidClient(await endpoints(named.id), "unbound, client_id given");
      // Bound to another machine user of the tenant than client_id names.
      await here.bindCertificate({ machineUserId: bound.id, identity });
      try {
        expectInvalidClient(await endpoints(named.id), "bound to another machine user");
      } finally {
        await here.unbindCertificate({ machineUserId: bound.id, identity });
      }
      // Bound in another tenant: not a client of this tenant's machine user.
      await there.bindCertificate({ machineUserId: foreign.id, identity });
      try {
        expectInvalidClient(await endpoints(named.id), "bound in another tenant");
      } finally {
        await there.unbindCertificate({ machineUserId: foreign.id, identity });
      }
    });

    it("audits grants as the RPCs they stand for: IssueAccessToken and RefreshToken, success and failure", async () => {
      const auditMu = await basicMachineWith(tenant.token, []);
      expect(
        (
          await token(
            { grant_type: "client_credentials" },
            { headers: clientSecretBasic(auditMu.username, auditMu.password) },
          )
        ).status,
      ).toBe(200);
      expect(
        (
          await token(
            { grant_type: "client_credentials" },
            { headers: clientSecretBasic(auditMu.username, "wrong") },
          )
        ).status,
      ).toBe(401);
      await ts.app.audit.flush();
      const { events } = await clientFor(AuditService, memoryTransport(ts.app), rootToken).listAuditEvents({
        action: "tessera.v1.MachineUserService/IssueAccessToken",
        pageSize: 200,
      });
      const mine = events.filter((e) => e.actorId === auditMu.id);
      expect(mine.map((e) => e.outcome)).toContain("success");
      expect(mine.find((e) => e.outcome === "success")!.tenantId).toBe(tenant.tenant.id);
      const failures = events.filter((e) => e.outcome === "failure" && e.reason === "CREDENTIALS_INVALID");
      expect(failures.length).toBeGreaterThan(0);
      const text = (v: unknown) => JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? String(x) : x));
      for (const e of events) expect(text(e)).not.toContain(auditMu.password);

      const login = await clientFor(UserService, memoryTransport(ts.app)).login({
        username: tenant.username,
        password: "tenant admin password",
        tenant: tenant.tenant.id,
      });
      const refreshed = await token({ grant_type: "refresh_token", refresh_token: login.refreshToken });
      expect(refreshed.status).toBe(200);
      expect((await token({ grant_type: "refresh_token", refresh_token: "tsr_rt_unknown" })).status).toBe(
        400,
      );
      await ts.app.audit.flush();
      const refreshes = (
        await clientFor(AuditService, memoryTransport(ts.app), rootToken).listAuditEvents({
          action: "tessera.v1.UserService/RefreshToken",
          pageSize: 200,
        })
      ).events;
      expect(refreshes.some((e) => e.outcome === "success")).toBe(true);
      expect(refreshes.some((e) => e.outcome === "failure" && e.reason === "TOKEN_INVALID")).toBe(true);
      for (const e of refreshes) expect(text(e)).not.toContain(login.refreshToken);

      // A revocation is recorded under its own action, naming what it revoked (never the token).
      const issued = await token(
        { grant_type: "client_credentials" },
        { headers: clientSecretBasic(auditMu.username, auditMu.password) },
      );
      await revoke(
        { token: issued.json.access_token as string },
        { headers: clientSecretBasic(auditMu.username, auditMu.password) },
      );
      await ts.app.audit.flush();
      const revocations = (
        await clientFor(AuditService, memoryTransport(ts.app), rootToken).listAuditEvents({
          action: "oauth2/revoke",
          actorId: auditMu.id,
          pageSize: 200,
        })
      ).events;
      expect(revocations.map((e) => [e.outcome, e.targetId, e.tenantId])).toEqual([
        ["success", auditMu.id, tenant.tenant.id],
      ]);
      expect(text(revocations)).not.toContain(issued.json.access_token as string);
    });
  });
}

describe("OAuth 2.0 token endpoint budgets (sqlite)", () => {
  let ts: TestServer;
  let agent: Agent;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, {
      rateLimit: { enabled: true, authFailuresPerIpPerMinute: 3, authFailuresPerUsernamePerIp: 100 },
      auth: { oauth: { issuer: "https://tessera.example.com:8443" } },
    });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent?.close();
    await ts?.close();
  });

  it("spends the address's failed-authentication budget as Basic does, then answers 429 with Retry-After", async () => {
    const post = async (secret: string) => {
      const res = await request(`${ts.server.url}/oauth2/token`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({
          grant_type: "client_credentials",
          client_id: "mu_someone",
          client_secret: secret,
        }).toString(),
      });
      return {
        status: res.statusCode,
        headers: res.headers,
        json: (await res.body.json()) as Record<string, string>,
      };
    };
    const statuses: number[] = [];
    for (let i = 0; i < 5; i++) statuses.push((await post(`wrong-${i}`)).status);
    expect(statuses.slice(0, 3)).toEqual([401, 401, 401]);
    const limited = await post("wrong-again");
    expect(limited.status).toBe(429);
    expect(limited.json.error).toBe("temporarily_unavailable");
    expect(Number(limited.headers["retry-after"])).toBeGreaterThan(0);
  });

  it("names the configured issuer in the discovery document", async () => {
    const res = await request(`${ts.server.url}/.well-known/oauth-authorization-server`, {
      dispatcher: agent,
    });
    const doc = (await res.body.json()) as Record<string, string>;
    expect(doc.issuer).toBe("https://tessera.example.com:8443");
    expect(doc.token_endpoint).toBe("https://tessera.example.com:8443/oauth2/token");
    expect(res.headers["cache-control"]).toBe("public, max-age=300");
  });
});

describe("OAuth 2.0 endpoints while PostgreSQL is away", () => {
  let env: OutageApp | undefined;
  let server: Awaited<ReturnType<typeof startServer>> | undefined;
  let agent: Agent;
  beforeAll(async () => {
    const certs = await createTestCerts();
    env = await startOutageApp("postgres", { server: { certDir: certs.dir } });
    server = await startServer(env.app);
    agent = new Agent({ connect: { ca: certs.ca } });
  });
  afterAll(async () => {
    await agent?.close();
    await server?.close(0);
    await env?.close();
  });

  it("answers temporarily_unavailable (503, Retry-After), not server_error, and serves again once it is back", async () => {
    const mem = memoryTransport(env!.app);
    const root = await adminLogin(mem);
    const created = await clients(mem, root).machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["cluster:read"],
    });
    const login = await clientFor(UserService, mem).login({ username: "admin", password: ADMIN_PASSWORD });
    const post = async (path: string, body: Record<string, string>, headers: Record<string, string> = {}) => {
      const res = await request(`${server!.url}${path}`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
        body: new URLSearchParams(body).toString(),
      });
      const text = await res.body.text();
      return { status: res.statusCode, headers: res.headers, json: text ? JSON.parse(text) : {} };
    };
    const basic = clientSecretBasic(created.username, created.password);
    expect((await post("/oauth2/token", { grant_type: "client_credentials" }, basic)).status).toBe(200);
    await env!.cut();
    try {
      const answers = [
        await post("/oauth2/token", { grant_type: "client_credentials" }, basic),
        await post("/oauth2/token", { grant_type: "refresh_token", refresh_token: login.refreshToken }),
        await post("/oauth2/revoke", { token: login.refreshToken }, basic),
      ];
      for (const a of answers) {
        expect(a.status).toBe(503);
        expect(a.json.error).toBe("temporarily_unavailable");
        expect(Number(a.headers["retry-after"])).toBeGreaterThan(0);
      }
      expect(env!.log.count("request failed")).toBe(0);
    } finally {
      await env!.restore();
    }
    let status = 0;
    for (let i = 0; i < 50 && status !== 200; i++) {
      status = (await post("/oauth2/token", { grant_type: "client_credentials" }, basic)).status;
      if (status !== 200) await new Promise((r) => setTimeout(r, 200));
    }
    expect(status).toBe(200);
    // The refresh token was not spent by the refused attempt.
    expect(
      (await post("/oauth2/token", { grant_type: "refresh_token", refresh_token: login.refreshToken }))
        .status,
    ).toBe(200);
  });
});
