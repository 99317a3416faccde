import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { AuditService } from "../gen/tessera/v1/audit_service_pb.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import type { App } from "../src/app.js";
import { ADMIN_TOKEN_PRINCIPAL_ID, createAdminTokenVerifier } from "../src/auth/admin-token.js";
import { ConfigError, loadConfig } from "../src/config.js";
import type { RequestState } from "../src/context.js";
import { main } from "../src/main.js";
import { Code, rejection } from "./errors-util.js";
import { clientFor, createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import { adminLogin, clients, short, tenantWithAdmin } from "./machine-fixtures.js";

const ADMIN_TOKEN = "static-admin-token-0123456789-abcdefghij";
const state: RequestState = { requestId: "r", ip: "127.0.0.1", certificate: null, principal: null };

describe("the static admin token verifier", () => {
  it("returns a superuser principal without a tenant for the exact token", async () => {
    const p = await createAdminTokenVerifier(ADMIN_TOKEN).verify(ADMIN_TOKEN, state);
    expect(p).toEqual({
      kind: "admin",
      method: "admin_token",
      id: ADMIN_TOKEN_PRINCIPAL_ID,
      tenantId: null,
      scopes: ["*"],
      certificate: null,
    });
  });

  it("passes on any other token of any length (null: not its shape)", async () => {
    const v = createAdminTokenVerifier(ADMIN_TOKEN);
    for (const t of [
      "",
      "x",
      ADMIN_TOKEN.slice(0, -1),
      `${ADMIN_TOKEN}x`,
      `${ADMIN_TOKEN.slice(0, -1)}X`,
      "y".repeat(100_000),
    ]) {
      expect(await v.verify(t, state)).toBeNull();
    }
  });

  it("refuses to be built with a token shorter than 32 characters", () => {
    expect(() => createAdminTokenVerifier("a".repeat(31))).toThrow(/at least 32 characters/);
  });
});

describe("admin token configuration", () => {
  it("rejects a TESSERA_ADMIN_TOKEN shorter than 32 characters, naming the variable", () => {
    let err: unknown;
    try {
      loadConfig({ env: { TESSERA_ADMIN_TOKEN: "too-short" } });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).toContain("TESSERA_ADMIN_TOKEN");
    expect((err as Error).message).toContain("at least 32 characters");
    expect((err as Error).message).not.toContain("too-short");
  });

  it("makes `tessera serve` refuse to start with a clear message", async () => {
    const saved = process.env.TESSERA_ADMIN_TOKEN;
    process.env.TESSERA_ADMIN_TOKEN = "too-short";
    const stderr = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    try {
      const code = await main(["node", "tessera", "serve", "--database", "sqlite::memory:"]);
      expect(code).toBe(2);
      const written = stderr.mock.calls.map((c) => String(c[0])).join("");
      expect(written).toContain(
        "admin.token [TESSERA_ADMIN_TOKEN]: admin.token (TESSERA_ADMIN_TOKEN) must be at least 32 characters",
      );
    } finally {
      stderr.mockRestore();
      if (saved === undefined) delete process.env.TESSERA_ADMIN_TOKEN;
      else process.env.TESSERA_ADMIN_TOKEN = saved;
    }
  });
});

describe.each(DATABASES)("the static admin token on $name", (db) => {
  let app: App;
  const as = (auth?: string | Record<string, string>) => clients(memoryTransport(app), auth);

  beforeAll(async () => {
    app = await createTestApp(db, { admin: { token: ADMIN_TOKEN } });
  });
  afterAll(async () => {
    await app.close();
  });

  it("acts as a superuser across tenants", async () => {
    const root = await adminLogin(memoryTransport(app));
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const admin = as(ADMIN_TOKEN);
    const { tenant } = await admin.tenants.createTenant({ name: `by-token-${short()}` });
    expect(tenant?.name).toMatch(/^by-token-/);
    const users = await admin.users.listUsers({ pageSize: 200 });
    expect(users.users.map((u) => u.tenantId)).toContain(b.tenant.id);
    const mu = await admin.machines.createMachineUser({
      tenantId: b.tenant.id,
      name: "by-admin-token",
      authType: MachineAuthType.BEARER,
      scopes: ["cluster:read"],
    });
    expect(mu.machineUser?.tenantId).toBe(b.tenant.id);
    expect((await admin.tenants.getApplication({ id: b.application.id })).application?.tenantId).toBe(
      b.tenant.id,
    );
  });

  it("creates in the default tenant where a request names none", async () => {
    const root = await adminLogin(memoryTransport(app));
    const me = await as(root).users.getCurrentUser({});
    const { application } = await as(ADMIN_TOKEN).tenants.createApplication({
      name: `default-app-${short()}`,
    });
    expect(application?.tenantId).toBe(me.tenantId);
    const mu = await as(ADMIN_TOKEN).machines.createMachineUser({
      name: `default-mu-${short()}`,
      authType: MachineAuthType.BASIC,
    });
    expect(mu.machineUser?.tenantId).toBe(me.tenantId);
    const { user } = await as(ADMIN_TOKEN).users.createUser({
      username: `u-${short()}`,
      password: "long enough password",
    });
    expect(user?.tenantId).toBe(me.tenantId);
  });

  it("may disable any tenant, having none of its own", async () => {
    const root = await adminLogin(memoryTransport(app));
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const res = await as(ADMIN_TOKEN).tenants.updateTenant({ id: b.tenant.id, disabled: true });
    expect(res.tenant?.disabled).toBe(true);
  });

  it("is refused by RPCs that admit only machines", async () => {
    const r = await rejection(as(ADMIN_TOKEN).machines.checkAuthentication({}));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.reason).toBe("PRINCIPAL_NOT_ALLOWED");
  });

  it("answers GetCurrentUser as itself: no tenant, every scope (tessera whoami)", async () => {
    const me = await as(ADMIN_TOKEN).users.getCurrentUser({});
    expect(me.id).toBe("admin-token");
    expect(me.username).toBe("admin-token");
    expect(me.tenantId).toBe("");
    expect(me.permissions).toEqual(["*"]);
  });

  it("refuses a near miss as an invalid token without echoing it", async () => {
    const near = `${ADMIN_TOKEN.slice(0, -1)}Z`;
    const r = await rejection(as(near).users.listUsers({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("TOKEN_INVALID");
    expect(r.error.metadata.get("www-authenticate")).toContain('error="invalid_token"');
    expect(r.message).not.toContain(near);
  });

  it("records its act on a tenant's object in that tenant, where the actor is the platform", async () => {
    const root = await adminLogin(memoryTransport(app));
    const b = await tenantWithAdmin(memoryTransport(app), root, ["admin:audit", "admin:users"]);
    const { user } = await as(b.token).users.createUser({
      username: `u-${short()}`,
      password: "a good long password",
    });
    await as(ADMIN_TOKEN).users.updateUser({ id: user!.id, disabled: true });
    await app.audit.flush();
    const read = async (token: string) =>
      (
        await clientFor(AuditService, memoryTransport(app), token).listAuditEvents({ targetId: user!.id })
      ).events
        .filter((e) => e.action === "tessera.v1.UserService/UpdateUser")
        .map((e) => [e.tenantId, e.actorKind, e.actorId]);
    expect(await read(b.token)).toEqual([[b.tenant.id, "admin", "platform"]]);
    expect(await read(ADMIN_TOKEN)).toEqual([[b.tenant.id, "admin", ADMIN_TOKEN_PRINCIPAL_ID]]);
  });

  it("records admin-token actions in the audit log without the token", async () => {
    const name = `audited-${short()}`;
    await as(ADMIN_TOKEN).tenants.createTenant({ name });
    await app.audit.flush();
    const rows = await app.sql.all<{ actor_kind: string; actor_id: string; action: string; outcome: string }>(
      "select actor_kind, actor_id, action, outcome from audit_events where action = ? and actor_id = ?",
      ["tessera.v1.TenantService/CreateTenant", ADMIN_TOKEN_PRINCIPAL_ID],
    );
    expect(rows.length).toBeGreaterThan(0);
    expect(rows[0]).toMatchObject({ actor_kind: "admin", outcome: "success" });
    const all = await app.sql.all<Record<string, unknown>>("select * from audit_events");
    expect(JSON.stringify(all)).not.toContain(ADMIN_TOKEN);
  });
});

describe.each(DATABASES)("without an admin token configured on $name", (db) => {
  let app: App;
  beforeAll(async () => {
    app = await createTestApp(db);
  });
  afterAll(async () => {
    await app.close();
  });

  it("treats the would-be admin token as an unknown bearer token", async () => {
    const r = await rejection(clients(memoryTransport(app), ADMIN_TOKEN).users.listUsers({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("TOKEN_INVALID");
  });
});
