import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";

/** Every field of `events` as one text (a time's seconds are a bigint). */
const text = (events: unknown[]) =>
  JSON.stringify(events, (_, v: unknown) => (typeof v === "bigint" ? String(v) : v));

/**
 * The tenant wall of the audit log against a superuser's records. A `*` principal (the
 * bootstrap admin lives in the default tenant) acts on every tenant's objects. Its act on an
 * object of tenant T is filed in T, so T's auditors (`admin:audit`, without `*`) see what the
 * platform did to them, with the actor shown as the platform, never by the default tenant's
 * user id or address; never in the actor's own tenant, whose auditors would read T's object
 * ids; an act on no single tenant (CreateTenant) stays the platform's (no tenant). Over TLS,
 * against a real server, on SQLite and PostgreSQL.
 */
describe.each(DATABASES)("a superuser's audit records on $name", (db) => {
  let ts: TestServer;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db);
    root = await adminLogin(ts.connect());
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("are filed in the tenant acted on, with the actor shown there as the platform, and nowhere else", async () => {
    const t = ts.connect();
    const admin = clients(t, root);
    const rootId = (await admin.users.getCurrentUser({})).id;
    const list = (token: string, filter: { targetId?: string; actorId?: string } = {}) =>
      clientFor(AuditService, t, token)
        .listAuditEvents({ pageSize: 500, ...filter })
        .then((r) => r.events);
    // An auditor of the default tenant (the superuser's own), without cross-tenant authority.
    const auditorName = `auditor-${short()}`;
    const password = `pw-${short()}-${short()}`;
    await admin.users.createUser({ username: auditorName, password, scopes: ["admin:audit"] });
    const defaultAuditor = (await createClient(UserService, t).login({ username: auditorName, password }))
      .accessToken;
    // Tenant T and another tenant T2, each with its own auditor.
    const tT = await tenantWithAdmin(t, root, ["admin:audit"]);
    const t2 = await tenantWithAdmin(t, root, ["admin:audit"]);

    // The superuser creates a user in T, then disables it.
    const { user } = await admin.users.createUser({
      username: `bob-${short()}`,
      password,
      scopes: [],
      tenantId: tT.tenant.id,
    });
    await admin.users.updateUser({ id: user!.id, disabled: true });
    await ts.app.audit.flush();
    const disable = { action: "tessera.v1.UserService/UpdateUser", targetId: user!.id, outcome: "success" };

    // T's auditor sees the disable of its user, in T, by the platform: kind kept, no id, no address.
    const inT = await list(tT.token, { targetId: user!.id });
    expect(inT).toEqual([
      expect.objectContaining({
        ...disable,
        tenantId: tT.tenant.id,
        actorKind: "user",
        actorId: "platform",
        ip: "",
      }),
      expect.objectContaining({
        action: "tessera.v1.UserService/CreateUser",
        tenantId: tT.tenant.id,
        actorId: "platform",
      }),
    ]);
    // Nothing T's auditor can read names the superuser, and its id finds nothing there (no
    // oracle of who acted); the platform's word finds what it did.
    expect(text(await list(tT.token))).not.toContain(rootId);
    expect(await list(tT.token, { actorId: rootId })).toEqual([]);
    expect((await list(tT.token, { actorId: "platform" })).map((e) => e.targetId)).toContain(user!.id);

    // The superuser's own tenant's auditor sees none of it, and no id of T's at all.
    const seen = await list(defaultAuditor);
    expect(seen.length).toBeGreaterThan(0); // its own creation and login at least
    const dump = text(seen);
    expect(dump).not.toContain(user!.id);
    expect(dump).not.toContain(tT.tenant.id);
    expect(await list(defaultAuditor, { targetId: user!.id })).toEqual([]);

    // T2's auditor sees nothing of T.
    const seen2 = text(await list(t2.token));
    expect(seen2).not.toContain(user!.id);
    expect(seen2).not.toContain(tT.tenant.id);
    expect(await list(t2.token, { targetId: user!.id })).toEqual([]);

    // A `*` reader sees the disable in T with the full actor; T's creation is the platform's (no tenant).
    const all = await list(root, { targetId: user!.id });
    expect(all[0]).toEqual(
      expect.objectContaining({ ...disable, tenantId: tT.tenant.id, actorKind: "user", actorId: rootId }),
    );
    expect(all[0]!.ip).not.toBe("");
    const created = await list(root, { targetId: tT.tenant.id, actorId: rootId });
    expect(created.map((e) => [e.action, e.tenantId])).toContainEqual([
      "tessera.v1.TenantService/CreateTenant",
      "",
    ]);
  });

  it("file a * verifier's check of a tenant's credential in that tenant, never in the verifier's own", async () => {
    const t = ts.connect();
    const admin = clients(t, root);
    const password = `pw-${short()}-${short()}`;
    const auditorName = `auditor-${short()}`;
    await admin.users.createUser({ username: auditorName, password, scopes: ["admin:audit"] });
    const defaultAuditor = (await createClient(UserService, t).login({ username: auditorName, password }))
      .accessToken;
    // A verifier of the default tenant holding `*`, and a user of tenant T with a token.
    const verifier = await bearerMachine(t, root, [], { scopes: ["*"] });
    const tT = await tenantWithAdmin(t, root, ["admin:audit"]);
    const username = `carol-${short()}`;
    await admin.users.createUser({ username, password, scopes: [], tenantId: tT.tenant.id });
    const carol = (await createClient(UserService, t).login({ username, password, tenant: tT.tenant.id }))
      .accessToken;
    const pat = await clientFor(TokenService, t, carol).createPersonalAccessToken({ name: "pat" });
    const answer = await clientFor(VerificationService, t, verifier.token).verifyCredential({
      credential: pat.token,
    });
    expect(answer.valid).toBe(true);
    await ts.app.audit.flush();
    const list = (token: string) =>
      clientFor(AuditService, t, token)
        .listAuditEvents({ action: "credential.verify", pageSize: 500 })
        .then((r) => r.events);

    // The default tenant's auditor never reads T's credential id through the verifier's records.
    expect(text(await list(defaultAuditor))).not.toContain(pat.id);
    // T's auditor sees its credential checked, by the platform.
    expect(await list(tT.token)).toEqual([
      expect.objectContaining({
        targetId: pat.id,
        tenantId: tT.tenant.id,
        actorKind: "machine",
        actorId: "platform",
        reason: "VALID",
      }),
    ]);
    // A `*` reader sees the verifier.
    const all = (await list(root)).filter((e) => e.targetId === pat.id);
    expect(all.map((e) => [e.tenantId, e.actorId])).toEqual([[tT.tenant.id, verifier.machine.id]]);
  });
});
