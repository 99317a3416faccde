import { randomBytes } from "node:crypto";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { budgetKey } from "../../src/client-ip.js";
import { hashRefreshToken } from "../../src/services/user/sessions.js";
import { rejection } from "../errors-util.js";
import {
  clientFor,
  DATABASES,
  memoryTransport,
  SQLITE,
  startTestServer,
  type TestServer,
} from "../helpers.js";
import { adminLogin, basic, clients, short, tenantWithAdmin, tlsAgents } from "../machine-fixtures.js";

/**
 * RFC 7009 §2.1 for public clients: a user whose access token expired revokes its refresh
 * token at `/oauth2/revoke` with that token alone, as Logout ends the session (it was
 * refused there: client authentication or a bearer was required). Only a refresh token:
 * anything else without client authentication stays refused, a client certificate is no
 * authority, and the answer tells nothing of whose token it was. Over TLS, as an attacker
 * or a plain client sends it. Each case here failed on the code before it.
 */

/** An answer of the endpoint: status, the raw body, headers. */
interface Answer {
  status: number;
  raw: string;
  headers: Record<string, string | string[] | undefined>;
}

/** POST `form` to `path` of `ts` through `dispatcher`. */
async function post(
  ts: TestServer,
  dispatcher: Agent,
  path: string,
  form: Record<string, string>,
  headers: Record<string, string> = {},
): Promise<Answer> {
  const res = await request(`${ts.server.url}${path}`, {
    method: "POST",
    dispatcher,
    headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
    body: new URLSearchParams(form).toString(),
  });
  return { status: res.statusCode, raw: await res.body.text(), headers: res.headers };
}

/** A made-up refresh token of the issued shape. */
const madeUp = () => `tsr_rt_${randomBytes(32).toString("base64url")}`;

for (const db of DATABASES) {
  describe(`a refresh token revoked with no client authentication (${db.name})`, () => {
    let ts: TestServer;
    let agent: Agent;
    let certAgent: Agent;
    let rootToken: string;
    let tenant: Awaited<ReturnType<typeof tenantWithAdmin>>;
    let other: Awaited<ReturnType<typeof tenantWithAdmin>>;

    beforeAll(async () => {
      // Limits on (wide): the answers carry the per-IP limit's headers, compared below.
      ts = await startTestServer(db, {
        server: { mtls: "optional" },
        rateLimit: { enabled: true, perIpPerMinute: 100_000, authFailuresPerIpPerMinute: 1000 },
      });
      ({ agent, certAgent } = tlsAgents(ts));
      const mem = memoryTransport(ts.app);
      rootToken = await adminLogin(mem);
      tenant = await tenantWithAdmin(mem, rootToken, ["admin:tenants", "admin:machine-users", "cluster:*"]);
      other = await tenantWithAdmin(mem, rootToken);
    });
    afterAll(async () => {
      await agent?.close();
      await certAgent?.close();
      await ts?.close();
    });

    const revoke = (
      form: Record<string, string>,
      opts: { headers?: Record<string, string>; cert?: boolean; requestId?: string } = {},
    ) =>
      post(ts, opts.cert ? certAgent : agent, "/oauth2/revoke", form, {
        ...(opts.requestId ? { "x-request-id": opts.requestId } : {}),
        ...opts.headers,
      });

    /** A fresh session of the tenant admin of `of`. */
    const login = (of: typeof tenant) =>
      clientFor(UserService, memoryTransport(ts.app)).login({
        username: of.username,
        password: "tenant admin password",
        tenant: of.tenant.id,
      });

    /** What an RPC over TLS (a user's, or a machine's) says of `token` now: "ok", or the reason it is refused. */
    async function works(token: string, machine = false): Promise<string> {
      try {
        if (machine) await clients(ts.connect(), token).machines.checkAuthentication({});
        else await clientFor(UserService, ts.connect(), token).getCurrentUser({});
        return "ok";
      } catch (err) {
        return (await rejection(Promise.reject(err))).reason ?? "refused";
      }
    }

    /** What the refresh_token grant says of `refreshToken` now: "ok" or its error. */
    async function refreshes(refreshToken: string): Promise<string> {
      const res = await post(ts, agent, "/oauth2/token", {
        grant_type: "refresh_token",
        refresh_token: refreshToken,
      });
      return res.status === 200 ? "ok" : String(JSON.parse(res.raw).error);
    }

    async function recordOf(requestId: string) {
      await ts.app.audit.flush();
      return ts.app.sql.all<Record<string, unknown>>(
        "select action, outcome, reason, actor_kind, actor_id, tenant_id, target_id from audit_events where request_id = ?",
        [requestId],
      );
    }

    it("ends the refresh token's session as Logout does, answered 200 with no body and recorded as Logout's (anonymous, in its user's tenant)", async () => {
      const session = await login(tenant);
      const requestId = `public-revoke-${short()}`;
      // As openid-client's None() sends it: client_id, the token and its hint.
      const res = await revoke(
        { token: session.refreshToken, token_type_hint: "refresh_token", client_id: "tessera-cli" },
        { requestId },
      );
      expect(res.status).toBe(200);
      expect(res.raw).toBe("");
      expect(res.headers["cache-control"]).toBe("no-store");
      // The session ended on the next request: its refresh token and its access token.
      expect(await refreshes(session.refreshToken)).toBe("invalid_grant");
      expect(await works(session.accessToken)).toBe("TOKEN_REVOKED");
      const family = (
        await ts.app.sql.get<{ family_id: string }>(
          "select family_id from refresh_tokens where token_hash = ?",
          [hashRefreshToken(session.refreshToken)],
        )
      )?.family_id;
      expect(family).toBeTruthy();
      expect(await recordOf(requestId)).toEqual([
        {
          action: "oauth2/revoke",
          outcome: "success",
          reason: null,
          actor_kind: "anonymous",
          actor_id: null,
          tenant_id: tenant.tenant.id,
          target_id: family,
        },
      ]);
      // A spent token of a live session ends it too, as Logout's would (its holder is its session's).
      const next = await login(tenant);
      const rotated = await clientFor(UserService, memoryTransport(ts.app)).refreshToken({
        refreshToken: next.refreshToken,
      });
      expect((await revoke({ token: next.refreshToken })).status).toBe(200);
      expect(await works(rotated.accessToken)).toBe("TOKEN_REVOKED");
      expect(await refreshes(rotated.refreshToken)).toBe("invalid_grant");
    });

    it("answers a made-up token, a malformed one and another tenant's alike: 200, no body, one point of the per-IP limit each", async () => {
      const foreign = await login(other);
      const hashesBefore = hashPool().stats().started;
      const answers: Answer[] = [];
      for (const token of [madeUp(), "tsr_rt_", `tsr_rt_${"x".repeat(5000)}`, foreign.refreshToken, madeUp()])
        answers.push(await revoke({ token }));
      const remaining: number[] = [];
      for (const a of answers) {
        expect(a.status).toBe(200);
        expect(a.raw).toBe("");
        expect(Object.keys(a.headers).sort()).toEqual(Object.keys(answers[0]!.headers).sort());
        expect(a.headers["x-ratelimit-limit"]).toBe(answers[0]!.headers["x-ratelimit-limit"]);
        remaining.push(Number(a.headers["x-ratelimit-remaining"]));
      }
      // The same budget, and only it: one request each of the address's limit, no password hashed.
      expect(remaining.map((r, i) => remaining[0]! - r - i)).toEqual([0, 0, 0, 0, 0]);
      expect(hashPool().stats().started).toBe(hashesBefore);
      // Holding another tenant's refresh token is its session's authority all the same.
      expect(await works(foreign.accessToken)).toBe("TOKEN_REVOKED");
    });

    it("still refuses every other credential presented alone (401 invalid_client) and revokes none of them", async () => {
      const session = await login(tenant);
      const pat = await clientFor(
        TokenService,
        memoryTransport(ts.app),
        session.accessToken,
      ).createPersonalAccessToken({ name: `pat-${short()}` });
      const apiKey = await clientFor(TokenService, memoryTransport(ts.app), session.accessToken).createApiKey(
        {
          name: `key-${short()}`,
        },
      );
      const machines = clients(memoryTransport(ts.app), tenant.token).machines;
      const bearerMu = await machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["cluster:read"],
      });
      const machineAccess = (
        await clients(memoryTransport(ts.app), bearerMu.token).machines.issueAccessToken({})
      ).accessToken;
      const credentials = {
        "a user's access token": session.accessToken,
        "a personal access token": pat.token,
        "an API key": apiKey.key,
        "a machine access token": machineAccess,
        "a machine user's credential": bearerMu.token,
      };
      for (const [what, token] of Object.entries(credentials)) {
        const res = await revoke({ token, client_id: "tessera-cli" });
        expect(res.status, what).toBe(401);
        expect(JSON.parse(res.raw).error, what).toBe("invalid_client");
        expect(await works(token, what.includes("machine")), what).toBe("ok");
      }
      // The same session's refresh token, alone, is what ends it.
      expect((await revoke({ token: session.refreshToken })).status).toBe(200);
      expect(await works(session.accessToken)).toBe("TOKEN_REVOKED");
    });

    it("never reads client credentials that fail as none, and counts no client certificate as authority", async () => {
      const session = await login(tenant);
      // A wrong secret, or a bearer that does not verify, with the refresh token: refused as
      // before (no fall back to the token's possession), the session stands.
      const mu = await clients(memoryTransport(ts.app), tenant.token).machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BASIC,
      });
      for (const headers of [
        basic(mu.username, "not its secret"),
        { authorization: "Bearer tsr_pat_nope" },
      ]) {
        const res = await revoke({ token: session.refreshToken }, { headers });
        expect(res.status).toBe(401);
      }
      expect(
        (await revoke({ token: session.refreshToken, client_id: mu.username, client_secret: "no" })).status,
      ).toBe(401);
      expect(await works(session.accessToken)).toBe("ok");
      // A connection whose certificate is bound to no one: the certificate does not stand for
      // client authentication (refused before as tls_client_auth), the refresh token alone does…
      expect((await revoke({ token: session.accessToken }, { cert: true })).status).toBe(401);
      expect(await works(session.accessToken)).toBe("ok");
      const viaCert = await revoke({ token: session.refreshToken }, { cert: true });
      expect(viaCert.status).toBe(200);
      expect(viaCert.raw).toBe("");
      expect(await works(session.accessToken)).toBe("TOKEN_REVOKED");
      // …and bound to a machine user, it still revokes only that machine user's tokens.
      const next = await login(tenant);
      const machines = clients(memoryTransport(ts.app), tenant.token).machines;
      const certMu = await machines.createMachineUser({
        name: `mu-${short()}`,
        authType: MachineAuthType.BEARER,
      });
      const identity = { case: "sha256Fingerprint" as const, value: ts.certs.clientFingerprint };
      await machines.bindCertificate({ machineUserId: certMu.machineUser!.id, identity });
      try {
        expect((await revoke({ token: next.accessToken }, { cert: true })).status).toBe(200);
        expect(await works(next.accessToken)).toBe("ok");
      } finally {
        await machines.unbindCertificate({ machineUserId: certMu.machineUser!.id, identity });
      }
    });
  });
}

describe("unauthenticated revocations and the endpoint's limits (sqlite)", () => {
  let ts: TestServer;
  let agent: Agent;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, {
      rateLimit: { enabled: true, perIpPerMinute: 4, authFailuresPerIpPerMinute: 1 },
    });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent?.close();
    await ts?.close();
  });

  it("counts each on the per-IP limit (429 with Retry-After past it), and spends no failure budget", async () => {
    const revoke = (token: string) => post(ts, agent, "/oauth2/revoke", { token });
    const statuses: number[] = [];
    for (let i = 0; i < 4; i++) statuses.push((await revoke(madeUp())).status);
    // Unknown tokens are no failed authentication: the address's failure budget (1) is whole.
    expect(statuses).toEqual([200, 200, 200, 200]);
    expect(ts.app.limits?.authFailures.spentNow(budgetKey("127.0.0.1"))).toBeUndefined();
    const limited = await revoke(madeUp());
    expect(limited.status).toBe(429);
    expect(JSON.parse(limited.raw).error).toBe("temporarily_unavailable");
    expect(Number(limited.headers["retry-after"])).toBeGreaterThan(0);
  });
});
