import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../gen/tessera/v1/audit_service_pb.js";
import type { App } from "../src/app.js";
import { Code, rejection } from "./errors-util.js";
import { clientFor, createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import { adminLogin, clients, short, tenantWithAdmin } from "./machine-fixtures.js";

describe.each(DATABASES)("AuditService.ListAuditEvents on $name", (db) => {
  let app: App;
  let root: string;
  let a: Awaited<ReturnType<typeof tenantWithAdmin>> & { userId: string; created: string[] };
  let b: Awaited<ReturnType<typeof tenantWithAdmin>> & { userId: string; created: string[] };
  const audit = (token: string) => clientFor(AuditService, memoryTransport(app), token);
  const as = (token: string) => clients(memoryTransport(app), token);

  /** A tenant admin who has created three users and failed to create a fourth. */
  async function busyTenant() {
    const t = await tenantWithAdmin(memoryTransport(app), root, ["admin:audit", "admin:users"]);
    const userId = (await as(t.token).users.getCurrentUser({})).id;
    const created: string[] = [];
    for (let i = 0; i < 3; i++) {
      const { user } = await as(t.token).users.createUser({
        username: `u-${short()}`,
        password: "a good long password",
      });
      created.push(user!.id);
    }
    await rejection(as(t.token).users.createUser({ username: `u-${short()}`, password: "short" }));
    return { ...t, userId, created };
  }

  beforeAll(async () => {
    app = await createTestApp(db);
    root = await adminLogin(memoryTransport(app));
    a = await busyTenant();
    b = await busyTenant();
    await as(a.token).users.updateUser({ id: a.created[0]!, disabled: true });
    await app.audit.flush();
  });
  afterAll(async () => {
    await app.close();
  });

  it("shows a tenant admin its own tenant's events, newest first, and never another tenant's", async () => {
    const { events } = await audit(a.token).listAuditEvents({ pageSize: 200 });
    expect(events.length).toBeGreaterThanOrEqual(5);
    expect(new Set(events.map((e) => e.tenantId))).toEqual(new Set([a.tenant.id]));
    const times = events.map((e) => timestampDate(e.time!).getTime());
    expect([...times].sort((x, y) => y - x)).toEqual(times);
    expect(events[0]).toMatchObject({
      action: "tessera.v1.UserService/UpdateUser",
      actorKind: "user",
      actorId: a.userId,
      targetId: a.created[0],
      outcome: "success",
    });
    // Naming another tenant reads like a tenant without events.
    expect((await audit(a.token).listAuditEvents({ tenantId: b.tenant.id })).events).toEqual([]);
    expect((await audit(a.token).listAuditEvents({ actorId: b.userId })).events).toEqual([]);
  });

  it("lets a * caller see every tenant and filter by one", async () => {
    const all = await audit(root).listAuditEvents({ pageSize: 200 });
    const tenants = new Set(all.events.map((e) => e.tenantId));
    expect(tenants.has(a.tenant.id) && tenants.has(b.tenant.id)).toBe(true);
    const onlyB = await audit(root).listAuditEvents({ tenantId: b.tenant.id, pageSize: 200 });
    expect(onlyB.events.length).toBeGreaterThanOrEqual(4);
    expect(new Set(onlyB.events.map((e) => e.tenantId))).toEqual(new Set([b.tenant.id]));
  });

  it("filters by actor, action, outcome, target, request id and time range", async () => {
    const c = audit(root);
    const byActor = await c.listAuditEvents({ actorId: b.userId, pageSize: 200 });
    // Its login, three creations and the refused one.
    expect(byActor.events.map((e) => e.action).reverse()).toEqual([
      "tessera.v1.UserService/Login",
      ...Array(4).fill("tessera.v1.UserService/CreateUser"),
    ]);
    expect(byActor.events.every((e) => e.actorId === b.userId)).toBe(true);

    const failures = await c.listAuditEvents({ tenantId: a.tenant.id, outcome: "failure" });
    expect(failures.events.map((e) => [e.action, e.reason])).toEqual([
      ["tessera.v1.UserService/CreateUser", "INVALID_ARGUMENT"],
    ]);

    const updates = await c.listAuditEvents({
      action: "tessera.v1.UserService/UpdateUser",
      tenantId: a.tenant.id,
    });
    expect(updates.events.map((e) => e.targetId)).toEqual([a.created[0]]);
    const byTarget = await c.listAuditEvents({ targetId: a.created[0]! });
    expect(byTarget.events.map((e) => e.action)).toEqual(["tessera.v1.UserService/UpdateUser"]);

    const one = updates.events[0]!;
    const byRequest = await c.listAuditEvents({ requestId: one.requestId });
    expect(byRequest.events.map((e) => e.id)).toEqual([one.id]);

    const at = timestampDate(one.time!).getTime();
    const after = await c.listAuditEvents({ tenantId: a.tenant.id, startTime: timestampFromMs(at) });
    expect(after.events.map((e) => e.id)).toEqual([one.id]);
    const before = await c.listAuditEvents({
      tenantId: a.tenant.id,
      endTime: timestampFromMs(at),
      pageSize: 200,
    });
    expect(before.events.map((e) => e.id)).not.toContain(one.id);
    expect(before.events.length).toBeGreaterThanOrEqual(4);

    const bad = await rejection(c.listAuditEvents({ outcome: "maybe" }));
    expect(bad.code).toBe(Code.InvalidArgument);
  });

  it("pages newest first with an opaque token, each event once", async () => {
    const full = (await audit(root).listAuditEvents({ tenantId: a.tenant.id, pageSize: 200 })).events.map(
      (e) => e.id,
    );
    const seen: string[] = [];
    let pageToken = "";
    do {
      const page = await audit(a.token).listAuditEvents({ pageSize: 2, pageToken });
      expect(page.events.length).toBeLessThanOrEqual(2);
      seen.push(...page.events.map((e) => e.id));
      pageToken = page.nextPageToken;
    } while (pageToken);
    expect(seen).toEqual(full);
    // A page token from another tenant's listing does not cross the wall.
    const bPage = await audit(root).listAuditEvents({ tenantId: b.tenant.id, pageSize: 1 });
    const crossed = await audit(a.token).listAuditEvents({ pageToken: bPage.nextPageToken, pageSize: 200 });
    expect(crossed.events.every((e) => e.tenantId === a.tenant.id)).toBe(true);
    const r = await rejection(audit(a.token).listAuditEvents({ pageToken: "not-a-token" }));
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.reason).toBe("INVALID_ARGUMENT");
  });

  it("requires the admin:audit scope", async () => {
    const t = await tenantWithAdmin(memoryTransport(app), root, ["admin:users", "admin:tenants"]);
    const r = await rejection(audit(t.token).listAuditEvents({}));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.reason).toBe("ACCESS_DENIED");
    expect(r.error.metadata.get("www-authenticate")).toContain('scope="admin:audit"');
    const anonymous = await rejection(clientFor(AuditService, memoryTransport(app)).listAuditEvents({}));
    expect(anonymous.code).toBe(Code.Unauthenticated);
  });
});
