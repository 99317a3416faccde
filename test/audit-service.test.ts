import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditService } from "../gen/tessera/v1/audit_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { AUDIT_TARGETS } from "../src/admission/audit.js";
import { authRuleFor } from "../src/admission/auth-rule.js";
import type { App } from "../src/app.js";
import { Code, rejection } from "./errors-util.js";
import { clientFor, createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import { adminLogin, bearerMachine, clients, short, tenantWithAdmin } from "./machine-fixtures.js";

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
    // The user's whole history: its creation is recorded under its id too.
    expect(byTarget.events.map((e) => e.action)).toEqual([
      "tessera.v1.UserService/UpdateUser",
      "tessera.v1.UserService/CreateUser",
    ]);

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

  describe("the target of every audited RPC", () => {
    /** The full names of the audited RPCs, from the descriptors of the services the app serves. */
    const audited = () =>
      app.services.flatMap((service) =>
        service.methods.filter((m) => authRuleFor(m).audit).map((m) => `${service.typeName}/${m.name}`),
      );
    /** The newest record of `action` (records are written in batches: flushed first). */
    async function newest(action: string) {
      await app.audit.flush();
      const { events } = await audit(root).listAuditEvents({ action: `tessera.v1.${action}`, pageSize: 1 });
      expect(events, action).toHaveLength(1);
      return events[0]!;
    }

    it("is decided for each one (a new audited RPC without a decision fails here)", () => {
      const names = audited();
      expect(names.length).toBeGreaterThanOrEqual(24);
      expect(names.filter((n) => !(n in AUDIT_TARGETS))).toEqual([]);
      // And no decision outlives its RPC.
      expect(Object.keys(AUDIT_TARGETS).filter((n) => !names.includes(n))).toEqual([]);
    });

    // Run by the tenant's admin, and by a `*` principal of another tenant (the bootstrap
    // admin) acting on the same tenant's objects: each record is in that tenant either way.
    it.each([
      ["the tenant's admin", false],
      ["a * principal of another tenant", true],
    ])(
      "names what each call acted on, so that target_id finds an object's whole history (by %s)",
      async (_, bySuperuser) => {
        const t = await tenantWithAdmin(memoryTransport(app), root, [
          "admin:audit",
          "admin:users",
          "admin:tenants",
          "admin:machine-users",
        ]);
        const actor = bySuperuser ? root : t.token;
        const inT = { tenantId: t.tenant.id };
        const admin = as(actor);
        const username = `u-${short()}`;
        const password = "a good long password";
        const login = () =>
          clients(memoryTransport(app)).users.login({ username, password, tenant: t.tenant.id });
        const tokens = (token: string) => clientFor(TokenService, memoryTransport(app), token);
        const machine = await bearerMachine(memoryTransport(app), actor, [t.application.id], inT);
        const m = as(machine.token).machines;
        const fp = Buffer.alloc(32, Math.floor(Math.random() * 256)).toString("hex");
        let userId = "";
        let bindingId = "";
        let backendId = "";
        // Each RPC (in the order they can run), with the target its record must name.
        const drivers: Record<string, () => Promise<string | null>> = {
          "TenantService/CreateTenant": async () =>
            (await as(root).tenants.createTenant({ name: `t-${short()}` })).tenant!.id,
          "TenantService/UpdateTenant": async () => {
            await as(root).tenants.updateTenant({ id: t.tenant.id, name: `t-${short()}` });
            return t.tenant.id;
          },
          "TenantService/CreateApplication": async () =>
            (await admin.tenants.createApplication({ name: `a-${short()}`, ...inT })).application!.id,
          "TenantService/DeleteApplication": async () => {
            const { application } = await admin.tenants.createApplication({ name: `a-${short()}`, ...inT });
            await admin.tenants.deleteApplication({ id: application!.id });
            return application!.id;
          },
          "UserService/CreateUser": async () => {
            userId = (await admin.users.createUser({ username, password, scopes: ["admin:audit"], ...inT }))
              .user!.id;
            return userId;
          },
          "UserService/Login": async () => {
            await login();
            return userId;
          },
          "UserService/RefreshToken": async () => {
            await clients(memoryTransport(app)).users.refreshToken({
              refreshToken: (await login()).refreshToken,
            });
            return userId;
          },
          "UserService/Logout": async () => {
            await clients(memoryTransport(app)).users.logout({ refreshToken: (await login()).refreshToken });
            return userId;
          },
          "UserService/ChangePassword": async () => {
            const token = (await login()).accessToken;
            await as(token).users.changePassword({ currentPassword: password, newPassword: password });
            return userId;
          },
          "TokenService/CreatePersonalAccessToken": async () =>
            (await tokens((await login()).accessToken).createPersonalAccessToken({ name: "pat" })).id,
          "TokenService/RevokePersonalAccessToken": async () => {
            const c = tokens((await login()).accessToken);
            const { id } = await c.createPersonalAccessToken({ name: "pat" });
            await c.revokePersonalAccessToken({ id });
            return id;
          },
          "TokenService/CreateApiKey": async () =>
            (await tokens((await login()).accessToken).createApiKey({ name: "key" })).id,
          "TokenService/RevokeApiKey": async () => {
            const c = tokens((await login()).accessToken);
            const { id } = await c.createApiKey({ name: "key" });
            await c.revokeApiKey({ id });
            return id;
          },
          "UserService/UpdateUser": async () => {
            await admin.users.updateUser({ id: userId, disabled: false });
            return userId;
          },
          "MachineUserService/CreateMachineUser": async () =>
            (await bearerMachine(memoryTransport(app), actor, [], inT)).machine.id,
          "MachineUserService/UpdateMachineUser": async () => {
            await admin.machines.updateMachineUser({ id: machine.machine.id, name: `mu-${short()}` });
            return machine.machine.id;
          },
          "MachineUserService/BindCertificate": async () => {
            const { binding } = await admin.machines.bindCertificate({
              machineUserId: machine.machine.id,
              identity: { case: "sha256Fingerprint", value: fp },
            });
            bindingId = binding!.id;
            return machine.machine.id;
          },
          "MachineUserService/UnbindCertificate": async () => {
            await admin.machines.unbindCertificate({
              machineUserId: machine.machine.id,
              identity: { case: "bindingId", value: bindingId },
            });
            return machine.machine.id;
          },
          "MachineUserService/RegisterBackend": async () => {
            backendId = (
              await m.registerBackend({
                callbackUrl: `https://backend-${short()}.example/cb`,
                version: "1",
                applicationId: t.application.id,
              })
            ).backendId;
            return backendId;
          },
          "MachineUserService/IssueAccessToken": async () => {
            await m.issueAccessToken({});
            return machine.machine.id;
          },
          "MachineUserService/DeregisterBackend": async () => {
            await admin.machines.deregisterBackend({ id: backendId });
            return backendId;
          },
          "MachineUserService/RotateMachineUserCredentials": async () => {
            await admin.machines.rotateMachineUserCredentials({ id: machine.machine.id });
            return machine.machine.id;
          },
          "MachineUserService/DeleteMachineUser": async () => {
            await admin.machines.deleteMachineUser({ id: machine.machine.id });
            return machine.machine.id;
          },
          "UserService/DeleteUser": async () => {
            await admin.users.deleteUser({ id: userId });
            return userId;
          },
        };
        // The drivers that act through `admin` (the run's actor), not as t's user or machine.
        const driversByAdmin = new Set([
          "TenantService/CreateApplication",
          "TenantService/DeleteApplication",
          "UserService/CreateUser",
          "UserService/UpdateUser",
          "UserService/DeleteUser",
          "MachineUserService/CreateMachineUser",
          "MachineUserService/UpdateMachineUser",
          "MachineUserService/BindCertificate",
          "MachineUserService/UnbindCertificate",
          "MachineUserService/DeregisterBackend",
          "MachineUserService/RotateMachineUserCredentials",
          "MachineUserService/DeleteMachineUser",
        ]);
        // Every audited RPC has a driver here: one added without a target decision fails.
        expect(
          audited()
            .map((n) => n.replace(/^tessera\.v1\./, ""))
            .sort(),
        ).toEqual(Object.keys(drivers).sort());
        // A * caller's records are in the tenant it acted on (UpdateTenant: t's, and all of them
        // in the second run), never in its own; a new tenant is on no tenant yet: the
        // platform's (no tenant). A handler that forgot to name its object's tenant fails here.
        const rootTenant = "";
        const asRoot = new Set(["TenantService/CreateTenant"]);
        for (const [action, drive] of Object.entries(drivers)) {
          const target = await drive();
          const event = await newest(action);
          expect([action, event.outcome, event.targetId], action).toEqual([action, "success", target]);
          // Recorded in the tenant the object is in: its admins see it.
          expect([action, event.tenantId], action).toEqual([
            action,
            asRoot.has(action) ? rootTenant : t.tenant.id,
          ]);
        }
        // t's auditor sees the * principal's acts on t with the actor as the platform, and only
        // those: every one the root ran above (and, in t's set-up, its application and admin).
        const platform = new Set([
          "TenantService/UpdateTenant",
          "TenantService/CreateApplication",
          "UserService/CreateUser",
        ]);
        if (bySuperuser)
          for (const action of Object.keys(drivers)) if (driversByAdmin.has(action)) platform.add(action);
        const shown = await audit(t.token).listAuditEvents({ actorId: "platform", pageSize: 500 });
        expect(new Set(shown.events.map((e) => e.action.replace(/^tessera\.v1\./, "")))).toEqual(platform);
        expect(new Set(shown.events.map((e) => [e.actorId, e.ip, e.tenantId].join(" ")))).toEqual(
          new Set([`platform  ${t.tenant.id}`]),
        );
        // The user's whole history, its creation included, under its id.
        const history = await audit(t.token).listAuditEvents({ targetId: userId, pageSize: 200 });
        expect(history.events.at(-1)!.action).toBe("tessera.v1.UserService/CreateUser");
        expect(history.events[0]!.action).toBe("tessera.v1.UserService/DeleteUser");
      },
    );

    it("records a failed Login of an existing user in its tenant, and an unknown username exactly as before", async () => {
      const t = await tenantWithAdmin(memoryTransport(app), root, ["admin:audit", "admin:users"]);
      const username = `u-${short()}`;
      const { user } = await as(t.token).users.createUser({ username, password: "a good long password" });
      const anonymous = clientFor(UserService, memoryTransport(app));
      await rejection(anonymous.login({ username, password: "wrong guess 1", tenant: t.tenant.id }));
      // The tenant's admin sees the guessing against its user.
      await app.audit.flush();
      const seen = await audit(t.token).listAuditEvents({
        action: "tessera.v1.UserService/Login",
        outcome: "failure",
      });
      expect(seen.events.map((e) => [e.outcome, e.reason, e.targetId, e.actorKind, e.actorId])).toEqual([
        ["failure", "CREDENTIALS_INVALID", user!.id, "anonymous", ""],
      ]);
      // No password anywhere in it.
      expect(JSON.stringify(seen.events, (_k, v) => (typeof v === "bigint" ? `${v}` : v))).not.toContain(
        "wrong guess",
      );

      // A username that does not exist: no tenant, no target (what a record said before
      // the targets), whatever tenant was named: the record is no oracle of existence.
      const ghost = `ghost-${short()}`;
      await rejection(anonymous.login({ username: ghost, password: "wrong guess 2", tenant: t.tenant.id }));
      await rejection(anonymous.login({ username: ghost, password: "wrong guess 3" }));
      const unknown = await newest("UserService/Login");
      expect(unknown).toMatchObject({
        outcome: "failure",
        reason: "CREDENTIALS_INVALID",
        tenantId: "",
        targetId: "",
        actorKind: "anonymous",
        actorId: "",
      });
      const inTenant = await audit(t.token).listAuditEvents({
        action: "tessera.v1.UserService/Login",
        outcome: "failure",
      });
      expect(inTenant.events).toHaveLength(1);
    });
  });
});
