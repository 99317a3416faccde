import * as oidc from "openid-client";
import { type Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  memoryTransport,
  startTestServer,
  type TestServer,
} from "./helpers.js";
import { adminLogin, clients, short, tenantWithAdmin, tlsAgents } from "./machine-fixtures.js";

/**
 * Tessera's OAuth 2.0 endpoints driven by openid-client (the Node ecosystem's certified
 * OAuth client), configured only from the discovery document, as any standard client
 * would be: no Tessera SDK. Its requests reach the real server over TLS (the dev CA
 * passed through its custom fetch), with a client certificate for tls_client_auth.
 */
for (const db of DATABASES) {
  describe(`openid-client against Tessera (${db.name})`, () => {
    let ts: TestServer;
    let agent: Agent;
    let certAgent: Agent;
    let mu: { id: string; username: string; password: string };
    let tenantToken: string;

    /** openid-client's fetch, through an agent that trusts the dev CA (and presents the client certificate when asked). */
    const fetchThrough =
      (dispatcher: Agent): oidc.CustomFetch =>
      (url, options) =>
        undiciFetch(url, { ...(options as object), dispatcher }) as unknown as Promise<Response>;

    const discover = (clientId: string, auth: oidc.ClientAuth, dispatcher = agent) =>
      oidc.discovery(new URL(ts.server.url), clientId, undefined, auth, {
        algorithm: "oauth2",
        [oidc.customFetch]: fetchThrough(dispatcher),
      });

    beforeAll(async () => {
      ts = await startTestServer(db);
      ({ agent, certAgent } = tlsAgents(ts));
      const mem = memoryTransport(ts.app);
      const root = await adminLogin(mem);
      const tenant = await tenantWithAdmin(mem, root, ["admin:tenants", "admin:machine-users", "cluster:*"]);
      tenantToken = tenant.token;
      const res = await clients(mem, tenantToken).machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BASIC,
        scopes: ["cluster:read", "cluster:write"],
      });
      mu = { id: res.machineUser!.id, username: res.username, password: res.password };
    });
    afterAll(async () => {
      await agent?.close();
      await certAgent?.close();
      await ts?.close();
    });

    const works = async (accessToken: string, cert = false) => {
      try {
        await clients(ts.connect({ clientCert: cert }), accessToken).machines.checkAuthentication({});
        return "ok";
      } catch (err) {
        return (await rejection(Promise.reject(err))).reason;
      }
    };

    it("discovers the server and gets a token with client_secret_basic, narrowed by scope", async () => {
      const config = await discover(mu.username, oidc.ClientSecretBasic(mu.password));
      const meta = config.serverMetadata();
      expect(meta.token_endpoint).toBe(`${ts.server.url}/oauth2/token`);
      expect(meta.revocation_endpoint).toBe(`${ts.server.url}/oauth2/revoke`);
      const all = await oidc.clientCredentialsGrant(config);
      expect(all.token_type).toBe("bearer");
      expect(all.scope).toBe("cluster:read cluster:write");
      expect(all.expiresIn()).toBeGreaterThan(0);
      expect(await works(all.access_token)).toBe("ok");
      const narrow = await oidc.clientCredentialsGrant(config, { scope: "cluster:read" });
      expect(narrow.scope).toBe("cluster:read");
      // Widening is refused with the RFC 6749 error, which openid-client surfaces as such.
      const err = (await oidc
        .clientCredentialsGrant(config, { scope: "admin:users" })
        .catch((e: unknown) => e)) as {
        error?: string;
      };
      expect(err.error).toBe("invalid_scope");
    });

    it("gets a token with client_secret_post, and openid-client sees invalid_client for a wrong secret", async () => {
      const config = await discover(mu.username, oidc.ClientSecretPost(mu.password));
      expect(await works((await oidc.clientCredentialsGrant(config)).access_token)).toBe("ok");
      const wrong = await discover(mu.username, oidc.ClientSecretPost("not the secret"));
      // A 401 with WWW-Authenticate (RFC 6749 §5.2), which openid-client raises as a challenge.
      const err = await oidc.clientCredentialsGrant(wrong).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(oidc.WWWAuthenticateChallengeError);
      const challenge = err as oidc.WWWAuthenticateChallengeError;
      expect(challenge.status).toBe(401);
      expect(challenge.cause[0]!.scheme).toBe("basic");
      expect(await challenge.response.json()).toMatchObject({ error: "invalid_client" });
    });

    it("gets a certificate-bound token with tls_client_auth", async () => {
      await clients(memoryTransport(ts.app), tenantToken).machines.bindCertificate({
        machineUserId: mu.id,
        identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
      });
      try {
        const config = await discover(mu.id, oidc.TlsClientAuth(), certAgent);
        const res = await oidc.clientCredentialsGrant(config);
        expect(await works(res.access_token, true)).toBe("ok");
        expect(await works(res.access_token, false)).toBe("TOKEN_NOT_BOUND");
      } finally {
        await clients(memoryTransport(ts.app), tenantToken).machines.unbindCertificate({
          machineUserId: mu.id,
          identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
        });
      }
    });

    it("revokes a machine access token (RFC 7009): refused on the next call", async () => {
      const config = await discover(mu.username, oidc.ClientSecretBasic(mu.password));
      const res = await oidc.clientCredentialsGrant(config);
      expect(await works(res.access_token)).toBe("ok");
      await oidc.tokenRevocation(config, res.access_token, { token_type_hint: "access_token" });
      expect(await works(res.access_token)).toBe("TOKEN_REVOKED");
    });

    it("refreshes a user session as a public client, and a reused refresh token is invalid_grant", async () => {
      const login = await clientFor(UserService, memoryTransport(ts.app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const config = await discover("tessera-cli", oidc.None());
      const next = await oidc.refreshTokenGrant(config, login.refreshToken);
      expect(next.refresh_token).toMatch(/^tsr_rt_/);
      const me = await clientFor(UserService, ts.connect(), next.access_token).getCurrentUser({});
      expect(me.username).toBe("admin");
      const err = (await oidc.refreshTokenGrant(config, login.refreshToken).catch((e: unknown) => e)) as {
        error?: string;
      };
      expect(err.error).toBe("invalid_grant");
    });

    it("revokes a user's refresh token as a public client (RFC 7009 §2.1, `none` in the metadata): its session ends", async () => {
      const login = await clientFor(UserService, memoryTransport(ts.app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      const config = await discover("tessera-cli", oidc.None());
      const meta = config.serverMetadata();
      expect(meta.token_endpoint_auth_methods_supported).toContain("none");
      expect(meta.revocation_endpoint_auth_methods_supported).toContain("none");
      // What a client does at sign-out once its access token has expired: the refresh token alone.
      await oidc.tokenRevocation(config, login.refreshToken, { token_type_hint: "refresh_token" });
      const err = (await oidc.refreshTokenGrant(config, login.refreshToken).catch((e: unknown) => e)) as {
        error?: string;
      };
      expect(err.error).toBe("invalid_grant");
      const me = await clientFor(UserService, ts.connect(), login.accessToken)
        .getCurrentUser({})
        .catch((e: unknown) => rejection(Promise.reject(e)));
      expect(me).toMatchObject({ reason: "TOKEN_REVOKED" });
    });
  });
}
