import tls from "node:tls";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  memoryTransport,
  SQLITE,
  startTestServer,
  type TestServer,
} from "../helpers.js";
import { adminLogin, basic, clients, short } from "../machine-fixtures.js";
import { captureLogs } from "./fixtures.js";

/**
 * Review of the OAuth 2.0 endpoints (/oauth2/token, /oauth2/introspect, /oauth2/revoke) as a
 * strict client and as an attacker, over TLS. Each case here failed on the code before it.
 */

/** POST a form to `path` through `dispatcher`. */
async function postForm(ts: TestServer, dispatcher: Agent, path: string, form: Record<string, string>) {
  const res = await request(`${ts.server.url}${path}`, {
    method: "POST",
    dispatcher,
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams(form).toString(),
  });
  const raw = await res.body.text();
  return { status: res.statusCode, json: JSON.parse(raw) as Record<string, unknown> };
}

describe("the refresh_token grant over a connection that presents a client certificate", () => {
  // mtls: require, where every client presents one: the users' CLIs and scripts among them.
  let ts: TestServer;
  let certAgent: Agent;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
    certAgent = new Agent({
      connect: { ca: ts.certs.ca, cert: ts.certs.clientCert, key: ts.certs.clientKey },
    });
  });
  afterAll(async () => {
    await certAgent?.close();
    await ts?.close();
  });

  it("rotates a user's refresh token as the RefreshToken RPC on that connection does: the certificate is no client authentication", async () => {
    const login = () =>
      clientFor(UserService, memoryTransport(ts.app)).login({ username: "admin", password: ADMIN_PASSWORD });
    // The RPC, over the same kind of connection, refreshes.
    const viaRpc = await clientFor(UserService, ts.connect({ clientCert: true })).refreshToken({
      refreshToken: (await login()).refreshToken,
    });
    expect(viaRpc.refreshToken).toMatch(/^tsr_rt_/);
    // The OAuth grant took the certificate (bound to no machine user) for tls_client_auth:
    // 401 invalid_client, so no user could refresh through /oauth2/token.
    const refreshToken = (await login()).refreshToken;
    const res = await postForm(ts, certAgent, "/oauth2/token", {
      grant_type: "refresh_token",
      refresh_token: refreshToken,
    });
    expect(res.json.error).toBeUndefined();
    expect(res.status).toBe(200);
    expect(res.json.refresh_token).toMatch(/^tsr_rt_/);
    // Reuse detection is the same on such a connection: a spent token is invalid_grant.
    const reuse = await postForm(ts, certAgent, "/oauth2/token", {
      grant_type: "refresh_token",
      refresh_token: refreshToken,
      client_id: "cli",
    });
    expect(reuse.status).toBe(400);
    expect(reuse.json.error).toBe("invalid_grant");
  });
});

describe("an OAuth request whose HTTP/1.1 client hangs up before its form is read", () => {
  let ts: TestServer;
  const logs = captureLogs("info");

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { log: { access: "info" } }, undefined, { logger: logs.logger });
  });
  afterAll(async () => {
    await ts?.close();
  });

  for (const path of ["/oauth2/token", "/oauth2/introspect", "/oauth2/revoke"])
    it(`is not logged as Tessera's fault (${path})`, async () => {
      // Anyone, unauthenticated, could write error lines ("request failed", a 500's) at will.
      const requestId = `oauth-hangup-${path.slice(8)}`;
      const socket = tls.connect({
        host: "127.0.0.1",
        port: ts.server.port,
        ca: ts.certs.ca,
        servername: "localhost",
        ALPNProtocols: ["http/1.1"],
      });
      socket.on("error", () => undefined);
      await new Promise((resolve) => socket.once("secureConnect", resolve));
      const head =
        `POST ${path} HTTP/1.1\r\nhost: localhost\r\n` +
        "content-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n" +
        `x-request-id: ${requestId}\r\n\r\n`;
      await new Promise<void>((resolve) =>
        socket.write(Buffer.concat([Buffer.from(head), Buffer.from("grant_type=client_")]), () => resolve()),
      );
      socket.destroy();
      await expect
        .poll(() => logs.lines.some((l) => l.msg === "access" && l.requestId === requestId), {
          timeout: 5000,
        })
        .toBe(true);
      // The error line, when there is one, follows the access line at once.
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(logs.lines.filter((l) => l.requestId === requestId && (l.level as number) >= 50)).toEqual([]);
    });
});

describe("the discovery document of a server signing with a shared secret (HS256)", () => {
  let ts: TestServer;
  let agent: Agent;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, {
      auth: { jwt: { secret: "a shared secret of at least 32 characters" } },
    });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent?.close();
    await ts?.close();
  });

  it("names no jwks_uri: the key set it would name is always empty", async () => {
    const get = async (path: string) => {
      const res = await request(`${ts.server.url}${path}`, { dispatcher: agent });
      return { status: res.statusCode, json: (await res.body.json()) as Record<string, unknown> };
    };
    const doc = await get("/.well-known/oauth-authorization-server");
    expect(doc.status).toBe(200);
    expect(doc.json.token_endpoint).toBe(`${ts.server.url}/oauth2/token`);
    expect(doc.json).not.toHaveProperty("jwks_uri");
    // The JWKS endpoint still answers, as before, with the empty set (the SDK's fallback reads it).
    expect(await get("/.well-known/jwks.json")).toEqual({ status: 200, json: { keys: [] } });
  });
});

describe("a scope parameter that names no scope (scope=+)", () => {
  let ts: TestServer;
  let agent: Agent;
  let mu: { username: string; password: string };
  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    agent = new Agent({ connect: { ca: ts.certs.ca } });
    const mem = memoryTransport(ts.app);
    const admin = await adminLogin(mem);
    const res = await clients(mem, admin).machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["cluster:read"],
    });
    mu = { username: res.username, password: res.password };
  });
  afterAll(async () => {
    await agent?.close();
    await ts?.close();
  });

  /** POST a raw form body to the token endpoint. */
  async function token(body: string, headers: Record<string, string> = {}) {
    const res = await request(`${ts.server.url}/oauth2/token`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
      body,
    });
    return { status: res.statusCode, json: (await res.body.json()) as Record<string, unknown> };
  }

  it("is invalid_scope (RFC 6749 §3.3: at least one scope-token), never a token with no scope nor one with every scope", async () => {
    // It form-decodes to blanks: the grant issued a token with no scope at all.
    for (const scope of ["+", "%20%20", "+%20+"]) {
      const res = await token(
        `grant_type=client_credentials&scope=${scope}`,
        basic(mu.username, mu.password),
      );
      expect(res.status, scope).toBe(400);
      expect(res.json.error, scope).toBe("invalid_scope");
      expect(res.json.access_token, scope).toBeUndefined();
    }
    // An empty value is an omitted parameter (§3.1): the default, every scope of the client.
    expect(
      (await token("grant_type=client_credentials&scope=", basic(mu.username, mu.password))).json.scope,
    ).toBe("cluster:read");
    // The refresh_token grant: refused before the token is spent, which then refreshes.
    const login = await clientFor(UserService, memoryTransport(ts.app)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const refresh = new URLSearchParams({ grant_type: "refresh_token", refresh_token: login.refreshToken });
    const blank = await token(`${refresh}&scope=+`);
    expect(blank.status).toBe(400);
    expect(blank.json.error).toBe("invalid_scope");
    const next = await token(refresh.toString());
    expect(next.status).toBe(200);
    expect(next.json.scope).toBe("*");
  });
});
