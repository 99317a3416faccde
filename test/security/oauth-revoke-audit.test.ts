import { createClient } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashRefreshToken } from "../../src/services/user/sessions.js";
import { ADMIN_PASSWORD, clientFor, SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basic, basicMachine, bearerMachine, clients, short } from "../machine-fixtures.js";

/**
 * `POST /oauth2/revoke` is recorded in the audit log whichever way it ends, as Logout and the
 * Revoke… RPCs record theirs: a caller trying tokens there with a client secret that does not
 * verify, or a credential the endpoint does not revoke, leaves a failure with its reason (it
 * left no record at all: only a revocation that succeeded was written).
 */
describe("the audit of /oauth2/revoke", () => {
  let ts: TestServer;
  let agent: Agent;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent?.close();
    await ts?.close();
  });

  async function revoke(token: string, headers: Record<string, string>, requestId: string) {
    const res = await request(`${ts.server.url}/oauth2/revoke`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded", "x-request-id": requestId, ...headers },
      body: new URLSearchParams({ token }).toString(),
    });
    await res.body.text();
    return res.statusCode;
  }

  async function recordOf(requestId: string) {
    await ts.app.audit.flush();
    return ts.app.sql.all<Record<string, unknown>>(
      "select action, outcome, reason, actor_kind, actor_id, tenant_id, target_id from audit_events where request_id = ?",
      [requestId],
    );
  }

  it("records a refused client and a credential it does not revoke as failures, with their reasons", async () => {
    const admin = await adminLogin(ts.grpc());
    const { tenant } = await clients(ts.grpc(), admin).tenants.createTenant({ name: `t-${short()}` });
    const mu = await basicMachine(ts.grpc(), admin, [], { tenantId: tenant!.id });
    const other = await bearerMachine(ts.grpc(), admin, [], { tenantId: tenant!.id });

    const wrong = `wrong-secret-${short()}`;
    expect(await revoke(other.token, basic(mu.username, "not its secret"), wrong)).toBe(401);
    expect(await recordOf(wrong)).toEqual([
      {
        action: "oauth2/revoke",
        outcome: "failure",
        reason: "CREDENTIALS_INVALID",
        actor_kind: "anonymous",
        actor_id: null,
        tenant_id: null,
        target_id: null,
      },
    ]);

    const unsupported = `unsupported-${short()}`;
    expect(await revoke(other.token, basic(mu.username, mu.password), unsupported)).toBe(400);
    expect(await recordOf(unsupported)).toEqual([
      {
        action: "oauth2/revoke",
        outcome: "failure",
        reason: "UNSUPPORTED_TOKEN_TYPE",
        actor_kind: "machine",
        actor_id: mu.machine.id,
        tenant_id: tenant!.id,
        target_id: null,
      },
    ]);

    // What succeeds is recorded as before.
    const nothing = `nothing-${short()}`;
    expect(await revoke("not-a-token-of-anyone", basic(mu.username, mu.password), nothing)).toBe(200);
    expect(await recordOf(nothing)).toMatchObject([{ outcome: "success", reason: "NOTHING_REVOKED" }]);
  });

  it("records a revocation that failed after revoking the token with the token as its target", async () => {
    // The token's revocation commits, then the revocation of the tokens made with it fails:
    // the record said the attempt failed, but not that (nor what) it had partly revoked.
    const admin = await adminLogin(ts.grpc());
    const parent = await clientFor(TokenService, ts.connect(), admin).createPersonalAccessToken({
      name: `parent-${short()}`,
    });
    const child = await clientFor(TokenService, ts.connect(), parent.token).createPersonalAccessToken({
      name: `child-${short()}`,
    });
    const trigger = `refuse_${short()}`;
    // The database refuses the second write (as a constraint, a full disk or a lost connection would).
    await ts.app.sql.run(
      `create trigger ${trigger} before update of revoked_at on api_tokens when old.id = '${child.id}' begin select raise(abort, 'refused'); end`,
      [],
    );
    try {
      const partly = `partly-${short()}`;
      expect(await revoke(parent.token, { authorization: `Bearer ${admin}` }, partly)).not.toBe(200);
      expect(await recordOf(partly)).toMatchObject([
        { action: "oauth2/revoke", outcome: "failure", actor_kind: "user", target_id: parent.id },
      ]);
      const revoked = await ts.app.sql.get<{ revoked_at: unknown }>(
        "select revoked_at from api_tokens where id = ?",
        [parent.id],
      );
      expect(revoked?.revoked_at).not.toBeNull();
    } finally {
      await ts.app.sql.run(`drop trigger ${trigger}`, []);
    }
  });
  it("records a revocation whose only write failed without a target (nothing was revoked)", async () => {
    const admin = await adminLogin(ts.grpc());
    const pat = await clientFor(TokenService, ts.connect(), admin).createPersonalAccessToken({
      name: `only-${short()}`,
    });
    const trigger = `refuse_${short()}`;
    await ts.app.sql.run(
      `create trigger ${trigger} before update of revoked_at on api_tokens when old.id = '${pat.id}' begin select raise(abort, 'refused'); end`,
      [],
    );
    try {
      const failed = `failed-${short()}`;
      expect(await revoke(pat.token, { authorization: `Bearer ${admin}` }, failed)).not.toBe(200);
      expect(await recordOf(failed)).toMatchObject([
        { action: "oauth2/revoke", outcome: "failure", actor_kind: "user", target_id: null },
      ]);
    } finally {
      await ts.app.sql.run(`drop trigger ${trigger}`, []);
    }
  });

  it("names the session when its refresh tokens' write fails after the session's committed", async () => {
    const login = await createClient(UserService, ts.grpc()).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const trigger = `refuse_${short()}`;
    await ts.app.sql.run(
      `create trigger ${trigger} before update of revoked_at on refresh_tokens begin select raise(abort, 'refused'); end`,
      [],
    );
    try {
      const partly = `session-${short()}`;
      expect(
        await revoke(login.refreshToken, { authorization: `Bearer ${login.accessToken}` }, partly),
      ).not.toBe(200);
      const [record] = await recordOf(partly);
      expect(record).toMatchObject({ outcome: "failure", actor_kind: "user" });
      const session = await ts.app.sql.get<{ family_id: string }>(
        "select family_id from refresh_tokens where token_hash = ?",
        [hashRefreshToken(login.refreshToken)],
      );
      expect(record?.target_id).toBe(session?.family_id);
    } finally {
      await ts.app.sql.run(`drop trigger ${trigger}`, []);
    }
  });

  it("records a public client's revocation (the refresh token alone) that failed part-way in its user's tenant, anonymous, naming the session", async () => {
    const login = await createClient(UserService, ts.grpc()).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    const me = await clientFor(UserService, ts.connect(), login.accessToken).getCurrentUser({});
    const trigger = `refuse_${short()}`;
    await ts.app.sql.run(
      `create trigger ${trigger} before update of revoked_at on refresh_tokens begin select raise(abort, 'refused'); end`,
      [],
    );
    try {
      const partly = `public-${short()}`;
      expect(await revoke(login.refreshToken, {}, partly)).not.toBe(200);
      const session = await ts.app.sql.get<{ family_id: string }>(
        "select family_id from refresh_tokens where token_hash = ?",
        [hashRefreshToken(login.refreshToken)],
      );
      expect(await recordOf(partly)).toEqual([
        {
          action: "oauth2/revoke",
          outcome: "failure",
          reason: expect.any(String),
          actor_kind: "anonymous",
          actor_id: null,
          tenant_id: me.tenantId,
          target_id: session?.family_id,
        },
      ]);
    } finally {
      await ts.app.sql.run(`drop trigger ${trigger}`, []);
    }
  });
});
