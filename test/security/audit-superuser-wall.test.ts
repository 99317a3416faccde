import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * The tenant wall of the audit log against a superuser's records. A `*` principal (the
 * bootstrap admin lives in the default tenant) acts on every tenant's objects; a record of
 * such an act stored in the actor's tenant would show a tenant admin of that tenant (with
 * `admin:audit`, without `*`) another tenant's objects: its users' ids, its own id. Records of
 * a cross-tenant principal are the platform's (no tenant, as the static admin token's are):
 * only a `*` reader sees them. Over TLS, against a real server, on SQLite and PostgreSQL.
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

  it("are never shown to an admin:audit reader of the superuser's own tenant, and are to a `*` reader", async () => {
    const t = ts.connect();
    const admin = clients(t, root);
    // An auditor of the default tenant (the superuser's own), without cross-tenant authority.
    const auditorName = `auditor-${short()}`;
    const password = `pw-${short()}-${short()}`;
    await admin.users.createUser({ username: auditorName, password, scopes: ["admin:audit"] });
    const auditor = (await createClient(UserService, t).login({ username: auditorName, password }))
      .accessToken;

    // The superuser acts in another tenant: creates it, a user in it, then changes that user.
    const { tenant } = await admin.tenants.createTenant({ name: `other-${short()}` });
    const { user } = await admin.users.createUser({
      username: `bob-${short()}`,
      password,
      scopes: [],
      tenantId: tenant!.id,
    });
    await admin.users.updateUser({ id: user!.id, disabled: true });
    await ts.app.audit.flush();

    const foreign = new Set([tenant!.id, user!.id]);
    const names = <E extends { targetId: string; tenantId: string }>(events: E[]) =>
      events.filter((e) => foreign.has(e.targetId) || foreign.has(e.tenantId));

    const seen = (await clientFor(AuditService, t, auditor).listAuditEvents({ pageSize: 500 })).events;
    // The auditor does see its own tenant's events (its own creation and login, at least).
    expect(seen.length).toBeGreaterThan(0);
    expect(names(seen)).toEqual([]);
    expect(
      (await clientFor(AuditService, t, auditor).listAuditEvents({ targetId: user!.id })).events,
    ).toEqual([]);

    // A `*` reader sees all three, as the platform's records (no tenant), with the superuser as actor.
    const all = (await clientFor(AuditService, t, root).listAuditEvents({ pageSize: 500 })).events;
    const acts = names(all).map((e) => ({ action: e.action, target: e.targetId, tenant: e.tenantId }));
    expect(acts).toEqual(
      expect.arrayContaining([
        { action: "tessera.v1.TenantService/CreateTenant", target: tenant!.id, tenant: "" },
        { action: "tessera.v1.UserService/CreateUser", target: user!.id, tenant: "" },
        { action: "tessera.v1.UserService/UpdateUser", target: user!.id, tenant: "" },
      ]),
    );
  });
});
