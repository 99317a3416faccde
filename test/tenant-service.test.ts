import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { Code, rejection } from "./errors-util.js";
import { createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import { adminLogin, basic, bearerMachine, clients, short, tenantWithAdmin } from "./machine-fixtures.js";

describe.each(DATABASES)("TenantService on $name", (db) => {
  let app: App;
  let root: string;
  const as = (auth?: string | Record<string, string>) => clients(memoryTransport(app), auth);

  beforeAll(async () => {
    app = await createTestApp(db);
    root = await adminLogin(memoryTransport(app));
  });
  afterAll(async () => {
    await app.close();
  });

  it("lets the bootstrap admin create, get, rename and list tenants", async () => {
    const name = `acme-${short()}`;
    const { tenant } = await as(root).tenants.createTenant({ name });
    expect(tenant?.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(tenant?.name).toBe(name);
    expect(tenant?.disabled).toBe(false);
    expect(tenant?.createdAt).toBeDefined();
    expect((await as(root).tenants.getTenant({ id: tenant!.id })).tenant?.name).toBe(name);
    const renamed = await as(root).tenants.updateTenant({ id: tenant!.id, name: `${name}-renamed` });
    expect(renamed.tenant?.name).toBe(`${name}-renamed`);
    const all = await as(root).tenants.listTenants({ pageSize: 200 });
    expect(all.tenants.map((t) => t.id)).toContain(tenant!.id);
    expect(all.tenants.map((t) => t.name)).toContain("default");
    expect(all.totalSize).toBe(all.tenants.length);
  });

  it("pages through tenants with a cursor", async () => {
    for (let i = 0; i < 3; i++) await as(root).tenants.createTenant({ name: `page-${short()}` });
    const seen: string[] = [];
    let pageToken = "";
    do {
      const page = await as(root).tenants.listTenants({ pageSize: 2, pageToken });
      expect(page.tenants.length).toBeLessThanOrEqual(2);
      seen.push(...page.tenants.map((t) => t.id));
      pageToken = page.nextPageToken;
    } while (pageToken);
    expect(new Set(seen).size).toBe(seen.length);
    expect(seen.length).toBe((await as(root).tenants.listTenants({ pageSize: 200 })).totalSize);
  });

  it("refuses a duplicate tenant name and an invalid one", async () => {
    const name = `dup-${short()}`;
    await as(root).tenants.createTenant({ name });
    const dup = await rejection(as(root).tenants.createTenant({ name }));
    expect(dup.code).toBe(Code.AlreadyExists);
    expect(dup.reason).toBe("ALREADY_EXISTS");
    for (const bad of ["", " padded ", "x".repeat(201), "tab\there"]) {
      const r = await rejection(as(root).tenants.createTenant({ name: bad }));
      expect(r.code).toBe(Code.InvalidArgument);
      expect(r.reason).toBe("INVALID_ARGUMENT");
    }
  });

  it("lets only a principal holding * create tenants", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const r = await rejection(as(b.token).tenants.createTenant({ name: `nope-${short()}` }));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.reason).toBe("ACCESS_DENIED");
  });

  it("requires the admin:tenants scope", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root, ["admin:machine-users"]);
    const r = await rejection(as(b.token).tenants.listTenants({}));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.reason).toBe("ACCESS_DENIED");
    expect(r.error.metadata.get("www-authenticate")).toContain('scope="admin:tenants"');
  });

  it("shows a tenant admin only its own tenant, and another tenant's id reads exactly like a missing one", async () => {
    const a = await tenantWithAdmin(memoryTransport(app), root);
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const list = await as(b.token).tenants.listTenants({});
    expect(list.tenants.map((t) => t.id)).toEqual([b.tenant.id]);
    expect(list.totalSize).toBe(1);
    expect((await as(b.token).tenants.getTenant({ id: b.tenant.id })).tenant?.id).toBe(b.tenant.id);

    const missing = randomUUID();
    const pairs: [() => Promise<unknown>, () => Promise<unknown>][] = [
      [
        () => as(b.token).tenants.getTenant({ id: a.tenant.id }),
        () => as(b.token).tenants.getTenant({ id: missing }),
      ],
      [
        () => as(b.token).tenants.updateTenant({ id: a.tenant.id, name: "taken-over" }),
        () => as(b.token).tenants.updateTenant({ id: missing, name: "taken-over" }),
      ],
      [
        () => as(b.token).tenants.createApplication({ tenantId: a.tenant.id, name: "x" }),
        () => as(b.token).tenants.createApplication({ tenantId: missing, name: "x" }),
      ],
      [
        () => as(b.token).tenants.listApplications({ tenantId: a.tenant.id }),
        () => as(b.token).tenants.listApplications({ tenantId: missing }),
      ],
      [
        () => as(b.token).tenants.getApplication({ id: a.application.id }),
        () => as(b.token).tenants.getApplication({ id: missing }),
      ],
      [
        () => as(b.token).tenants.deleteApplication({ id: a.application.id }),
        () => as(b.token).tenants.deleteApplication({ id: missing }),
      ],
    ];
    for (const [foreign, absent] of pairs) {
      const f = await rejection(foreign());
      const m = await rejection(absent());
      expect(f.code).toBe(Code.NotFound);
      expect(f.reason).toBe("NOT_FOUND");
      expect({ code: f.code, reason: f.reason, message: f.message }).toEqual({
        code: m.code,
        reason: m.reason,
        message: m.message,
      });
    }
    // Nothing changed in tenant A.
    expect((await as(root).tenants.getTenant({ id: a.tenant.id })).tenant?.name).toBe(a.tenant.name);
    expect((await as(root).tenants.getApplication({ id: a.application.id })).application?.name).toBe(
      "app-one",
    );
  });

  it("answers NotFound for an id that is not a UUID", async () => {
    const r = await rejection(as(root).tenants.getTenant({ id: "not-a-uuid" }));
    expect(r.code).toBe(Code.NotFound);
  });

  it("creates applications in the caller's tenant by default, unique by name within a tenant", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const { application } = await as(b.token).tenants.createApplication({ name: "billing" });
    expect(application?.tenantId).toBe(b.tenant.id);
    const dup = await rejection(as(b.token).tenants.createApplication({ name: "billing" }));
    expect(dup.code).toBe(Code.AlreadyExists);
    // The same name in another tenant is fine.
    const c = await tenantWithAdmin(memoryTransport(app), root);
    expect((await as(c.token).tenants.createApplication({ name: "billing" })).application?.tenantId).toBe(
      c.tenant.id,
    );
    const mine = await as(b.token).tenants.listApplications({});
    expect(mine.applications.map((x) => x.name).sort()).toEqual(["app-one", "billing"]);
    expect(mine.applications.every((x) => x.tenantId === b.tenant.id)).toBe(true);
    expect(mine.totalSize).toBe(2);
  });

  it("lets a superuser list one tenant's applications or all of them", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const c = await tenantWithAdmin(memoryTransport(app), root);
    const onlyB = await as(root).tenants.listApplications({ tenantId: b.tenant.id });
    expect(onlyB.applications.map((x) => x.id)).toEqual([b.application.id]);
    const all = await as(root).tenants.listApplications({ pageSize: 200 });
    const ids = all.applications.map((x) => x.id);
    expect(ids).toContain(b.application.id);
    expect(ids).toContain(c.application.id);
  });

  it("deletes an application with its machine-user assignments", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const { application } = await as(b.token).tenants.createApplication({ name: "doomed" });
    const { machine } = await bearerMachine(memoryTransport(app), b.token, [
      application!.id,
      b.application.id,
    ]);
    await as(b.token).tenants.deleteApplication({ id: application!.id });
    expect((await rejection(as(b.token).tenants.getApplication({ id: application!.id }))).code).toBe(
      Code.NotFound,
    );
    const after = await as(b.token).machines.getMachineUser({ id: machine.id });
    expect(after.machineUser?.applicationIds).toEqual([b.application.id]);
  });

  it("refuses the users of a disabled tenant on their next request, and lets them back in when re-enabled", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    expect((await as(b.token).users.getCurrentUser({})).tenantId).toBe(b.tenant.id);
    expect(
      (await as(basic(`${b.tenant.id}/${b.username}`, "tenant admin password")).users.getCurrentUser({}))
        .username,
    ).toBe(b.username);

    await as(root).tenants.updateTenant({ id: b.tenant.id, disabled: true });
    expect((await as(root).tenants.getTenant({ id: b.tenant.id })).tenant?.disabled).toBe(true);
    // Basic answers a correct password in a disabled tenant like a wrong one (no oracle).
    for (const [auth, reason] of [
      [b.token, "PRINCIPAL_DISABLED"],
      [basic(`${b.tenant.id}/${b.username}`, "tenant admin password"), "CREDENTIALS_INVALID"],
    ] as const) {
      const r = await rejection(as(auth).users.getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe(reason);
    }
    const login = await rejection(
      as().users.login({ username: b.username, password: "tenant admin password", tenant: b.tenant.id }),
    );
    expect(login.code).toBe(Code.Unauthenticated);

    await as(root).tenants.updateTenant({ id: b.tenant.id, disabled: false });
    expect((await as(b.token).users.getCurrentUser({})).username).toBe(b.username);
  });

  it("refuses the machine users of a disabled tenant on their next request", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const { token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id]);
    expect((await as(token).machines.checkAuthentication({})).authenticated).toBe(true);
    await as(root).tenants.updateTenant({ id: b.tenant.id, disabled: true });
    const r = await rejection(as(token).machines.checkAuthentication({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("PRINCIPAL_DISABLED");
  });

  it("does not let anyone disable the tenant they belong to", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const own = await rejection(as(b.token).tenants.updateTenant({ id: b.tenant.id, disabled: true }));
    expect(own.code).toBe(Code.FailedPrecondition);
    expect(own.reason).toBe("FAILED_PRECONDITION");
    const me = await as(root).users.getCurrentUser({});
    const rootOwn = await rejection(as(root).tenants.updateTenant({ id: me.tenantId, disabled: true }));
    expect(rootOwn.code).toBe(Code.FailedPrecondition);
  });

  it("lets only a principal holding * create users in another tenant (UserService.CreateUser tenant_id)", async () => {
    const a = await tenantWithAdmin(memoryTransport(app), root, ["admin:users", "admin:tenants"]);
    const b = await tenantWithAdmin(memoryTransport(app), root, ["admin:users", "admin:tenants"]);
    const { user } = await as(root).users.createUser({
      username: `u-${short()}`,
      password: "long enough password",
      tenantId: b.tenant.id,
    });
    expect(user?.tenantId).toBe(b.tenant.id);
    const own = await as(b.token).users.createUser({
      username: `u-${short()}`,
      password: "long enough password",
      tenantId: b.tenant.id,
    });
    expect(own.user?.tenantId).toBe(b.tenant.id);
    const cross = await rejection(
      as(b.token).users.createUser({
        username: `u-${short()}`,
        password: "long enough password",
        tenantId: a.tenant.id,
      }),
    );
    // Another tenant reads exactly like one that does not exist.
    expect(cross.code).toBe(Code.NotFound);
    expect(cross.reason).toBe("NOT_FOUND");
  });

  it("answers UserService calls for another tenant's user exactly as for a missing id", async () => {
    const a = await tenantWithAdmin(memoryTransport(app), root, ["admin:users"]);
    const b = await tenantWithAdmin(memoryTransport(app), root, ["admin:users"]);
    const victim = (await as(a.token).users.getCurrentUser({})).id;
    const missing = randomUUID();
    const u = as(b.token).users;
    const probes: ((id: string) => Promise<unknown>)[] = [
      (id) => u.getUser({ id }),
      (id) => u.updateUser({ id, disabled: true }),
      (id) => u.deleteUser({ id }),
    ];
    for (const probe of probes) {
      const f = await rejection(probe(victim));
      const m = await rejection(probe(missing));
      expect(f.code).toBe(Code.NotFound);
      expect({ code: f.code, reason: f.reason, message: f.message }).toEqual({
        code: m.code,
        reason: m.reason,
        message: m.message,
      });
    }
    expect((await as(a.token).users.getCurrentUser({})).id).toBe(victim);
  });

  it("reserves the mu_ prefix of usernames for machine users", async () => {
    const r = await rejection(
      as(root).users.createUser({ username: `mu_${short()}`, password: "long enough password" }),
    );
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.reason).toBe("INVALID_ARGUMENT");
  });

  it("keeps machine principals out of TenantService", async () => {
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const { token } = await bearerMachine(memoryTransport(app), b.token, [b.application.id], {
      scopes: ["admin:tenants"],
    });
    const r = await rejection(as(token).tenants.listTenants({}));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.reason).toBe("PRINCIPAL_NOT_ALLOWED");
  });
});
