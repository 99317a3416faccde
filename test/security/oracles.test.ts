import { randomUUID } from "node:crypto";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { User } from "../../src/storage/entities.js";
import { Code, rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basic, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { LIMITS_ON } from "./fixtures.js";

/**
 * Existence oracles (issue #18, item 10; certificate bindings are tested with their own
 * class): over TLS, what an attacker learns from a refusal must not depend on whether
 * something exists in another tenant, or on whether a guessed password of a disabled
 * account was right. Usernames are unique per tenant (Login and HTTP Basic may name the
 * tenant; without one, only the default tenant's users and those from before usernames were
 * per tenant are reached), and only `*` renames tenants.
 */

const PASSWORD = "correct horse battery staple";

/** Everything a client can see of a refusal. */
async function refusal(call: Promise<unknown>) {
  const r = await rejection(call);
  return {
    code: r.code,
    reason: r.reason,
    message: r.message,
    challenge: r.error.metadata.get("www-authenticate"),
  };
}

describe.each(DATABASES)("existence oracles over TLS on $name", (db) => {
  let ts: TestServer;
  let t: Transport;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db);
    t = ts.connect();
    root = await adminLogin(t);
  });
  afterAll(async () => {
    await ts.close();
  });

  it("CreateUser naming another tenant's id reads exactly like a tenant id that does not exist", async () => {
    const mine = await tenantWithAdmin(t, root, ["admin:users"]);
    const other = await tenantWithAdmin(t, root, ["admin:users"]);
    const create = (tenantId: string) =>
      clients(t, mine.token).users.createUser({ username: `u-${short()}`, password: PASSWORD, tenantId });
    const foreign = await refusal(create(other.tenant.id));
    const missing = await refusal(create(randomUUID()));
    expect(foreign).toEqual(missing);
    expect(foreign.code).toBe(Code.NotFound);
    expect(foreign.reason).toBe("NOT_FOUND");
    // Over gRPC as well.
    const grpc = await refusal(
      clients(ts.grpc(), mine.token).users.createUser({
        username: `u-${short()}`,
        password: PASSWORD,
        tenantId: other.tenant.id,
      }),
    );
    expect(grpc.code).toBe(Code.NotFound);
    expect(grpc.reason).toBe("NOT_FOUND");
  });

  it("HTTP Basic answers a disabled user's correct password exactly like a wrong one", async () => {
    const username = `u-${short()}`;
    const { user } = await clients(t, root).users.createUser({ username, password: PASSWORD, scopes: [] });
    await clients(t, root).users.updateUser({ id: user!.id, disabled: true });
    const me = (password: string) => clients(t, basic(username, password)).users.getCurrentUser({});
    const right = await refusal(me(PASSWORD));
    const wrong = await refusal(me("not the password at all"));
    expect(right).toEqual(wrong);
    expect(right.code).toBe(Code.Unauthenticated);
    expect(right.reason).toBe("CREDENTIALS_INVALID");
    // Asked again (a verified password would be remembered): still the same answer.
    expect(await refusal(me(PASSWORD))).toEqual(wrong);
  });

  it("HTTP Basic answers a correct password in a disabled tenant exactly like a wrong one", async () => {
    const b = await tenantWithAdmin(t, root, ["admin:users"]);
    await clients(t, root).tenants.updateTenant({ id: b.tenant.id, disabled: true });
    const me = (password: string) =>
      clients(t, basic(`${b.tenant.name}/${b.username}`, password)).users.getCurrentUser({});
    const right = await refusal(me("tenant admin password"));
    const wrong = await refusal(me("not the password at all"));
    expect(right).toEqual(wrong);
    expect(right.reason).toBe("CREDENTIALS_INVALID");
  });

  it.each([
    ["off", false],
    ["on (the default)", true],
  ])(
    "HTTP Basic answers an unknown username exactly like a known one's wrong password, rate limits %s",
    async (_, limits) => {
      const limited = limits ? await startTestServer(db, { rateLimit: { enabled: true } }) : undefined;
      try {
        const lt = limited ? limited.connect() : t;
        const admin = limited ? await adminLogin(lt) : root;
        const b = await tenantWithAdmin(lt, admin, ["admin:users"]);
        const mu = await clients(lt, admin).machines.createMachineUser({
          name: `mu-${short()}`,
          authType: MachineAuthType.BASIC,
        });
        const me = (user: string) =>
          refusal(clients(lt, basic(user, "not the password at all")).users.getCurrentUser({}));
        const wrong = await me(`${b.tenant.name}/${b.username}`);
        expect(wrong.code).toBe(Code.Unauthenticated);
        expect(wrong.reason).toBe("CREDENTIALS_INVALID");
        for (const unknown of [
          `nobody-${short()}`,
          `${b.tenant.name}/nobody-${short()}`,
          `no-such-tenant-${short()}/${b.username}`,
          `mu_${short()}`,
          mu.username.slice(0, -1),
        ]) {
          expect(await me(unknown), unknown).toEqual(wrong);
        }
      } finally {
        await limited?.close();
      }
    },
  );

  it("HTTP Basic answers a disabled machine user's correct password exactly like a wrong one", async () => {
    const created = await clients(t, root).machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BASIC,
    });
    await clients(t, root).machines.updateMachineUser({ id: created.machineUser!.id, disabled: true });
    const check = (password: string) =>
      clients(t, basic(created.username, password)).machines.checkAuthentication({});
    const right = await refusal(check(created.password));
    const wrong = await refusal(check("not the password at all"));
    expect(right).toEqual(wrong);
    expect(right.code).toBe(Code.Unauthenticated);
    expect(right.reason).toBe("CREDENTIALS_INVALID");
    expect(await refusal(check(created.password))).toEqual(wrong);
  });

  describe("usernames per tenant", () => {
    const OLDER = "the older account's password";
    const NEWER = "the newer account's password";
    /** One username in two tenants: `older` created first. */
    async function twoSameNamed() {
      const older = await tenantWithAdmin(t, root, ["admin:users"]);
      const newer = await tenantWithAdmin(t, root, ["admin:users"]);
      const username = `same-${short()}`;
      const root_ = clients(t, root).users;
      await root_.createUser({ username, password: OLDER, tenantId: older.tenant.id });
      await root_.createUser({ username, password: NEWER, tenantId: newer.tenant.id });
      return { username, older: older.tenant, newer: newer.tenant };
    }
    const login = (username: string, password: string, tenant = "") =>
      createClient(UserService, t).login({ username, password, tenant });

    it("a tenant admin creating a username taken only in another tenant succeeds like a fresh name; one taken in its own tenant is AlreadyExists", async () => {
      const mine = await tenantWithAdmin(t, root, ["admin:users"]);
      const other = await tenantWithAdmin(t, root, ["admin:users"]);
      const taken = `u-${short()}`;
      await clients(t, other.token).users.createUser({ username: taken, password: PASSWORD });
      const create = (username: string) =>
        clients(t, mine.token).users.createUser({ username, password: PASSWORD });
      const elsewhere = await create(taken);
      const fresh = await create(`u-${short()}`);
      for (const created of [elsewhere, fresh]) expect(created.user?.tenantId).toBe(mine.tenant.id);
      expect(elsewhere.user?.username).toBe(taken);
      // Over gRPC as well, and now the name is taken in its own tenant.
      const again = await refusal(
        clients(ts.grpc(), mine.token).users.createUser({ username: taken, password: PASSWORD }),
      );
      expect(again.code).toBe(Code.AlreadyExists);
      expect(again.reason).toBe("ALREADY_EXISTS");
    });

    it("Login naming the tenant, by name or by id, logs in the right one of two same-named users", async () => {
      const { username, older, newer } = await twoSameNamed();
      expect((await login(username, OLDER, older.name)).user?.tenantId).toBe(older.id);
      expect((await login(username, NEWER, newer.name)).user?.tenantId).toBe(newer.id);
      expect((await login(username, OLDER, older.id)).user?.tenantId).toBe(older.id);
      expect((await login(username, NEWER, newer.id)).user?.tenantId).toBe(newer.id);
      // One account's password in the other's tenant, an unknown tenant: a wrong password.
      const wrong = await refusal(login(username, "not the password at all", newer.name));
      expect(wrong.code).toBe(Code.Unauthenticated);
      expect(wrong.reason).toBe("CREDENTIALS_INVALID");
      expect(await refusal(login(username, OLDER, newer.name))).toEqual(wrong);
      expect(await refusal(login(username, OLDER, `no-such-tenant-${short()}`))).toEqual(wrong);
      expect(await refusal(login(username, OLDER, randomUUID()))).toEqual(wrong);
    });

    it("Login without a tenant never reaches a tenant admin's new user, so it tells nothing of other tenants' names", async () => {
      const mine = await tenantWithAdmin(t, root, ["admin:users"]);
      const other = await tenantWithAdmin(t, root, ["admin:users"]);
      const taken = `u-${short()}`;
      const fresh = `u-${short()}`;
      await clients(t, other.token).users.createUser({
        username: taken,
        password: "someone else's password",
      });
      // The tenant admin creates both names in its own tenant with a password it knows...
      for (const username of [taken, fresh])
        await clients(t, mine.token).users.createUser({ username, password: PASSWORD });
      // ...and a tenant-less login answers alike, whether or not another tenant had the name.
      const elsewhere = await refusal(login(taken, PASSWORD));
      expect(elsewhere.reason).toBe("CREDENTIALS_INVALID");
      expect(await refusal(login(fresh, PASSWORD))).toEqual(elsewhere);
      expect(await refusal(login(fresh, "not the password at all"))).toEqual(elsewhere);
      // Naming the tenant, both log in.
      for (const username of [taken, fresh])
        expect((await login(username, PASSWORD, mine.tenant.name)).user?.tenantId).toBe(mine.tenant.id);
    });

    it("Login without a tenant logs in the default tenant's user, and a user from before usernames were per tenant", async () => {
      const { username, older, newer } = await twoSameNamed();
      // Neither is in the default tenant nor from before: a username alone reaches neither.
      const wrong = await refusal(login(username, "not the password at all"));
      expect(await refusal(login(username, OLDER))).toEqual(wrong);
      expect(await refusal(login(username, NEWER))).toEqual(wrong);
      // A user that existed while usernames were global (the migration marks them) keeps
      // logging in with its username alone, whatever same-named users other tenants have.
      await ts.app.storage.em
        .fork()
        .nativeUpdate(User, { username, tenantId: older.id }, { tenantlessLogin: true });
      expect((await login(username, OLDER)).user?.tenantId).toBe(older.id);
      expect(await refusal(login(username, NEWER))).toEqual(wrong);
      expect((await login(username, NEWER, newer.id)).user?.tenantId).toBe(newer.id);
      // The default tenant's user of a name is reached without a tenant (the bootstrap admin's
      // tenant), even when another tenant had the name first.
      const { user } = await clients(t, root).users.createUser({
        username: `d-${username}`,
        password: PASSWORD,
      });
      await clients(t, root).users.createUser({
        username: `d-${username}`,
        password: NEWER,
        tenantId: newer.id,
      });
      expect((await login(`d-${username}`, PASSWORD)).user?.tenantId).toBe(user?.tenantId);
      // Over gRPC too.
      const grpc = await createClient(UserService, ts.grpc()).login({ username, password: OLDER });
      expect(grpc.user?.tenantId).toBe(older.id);
    });

    it("HTTP Basic as <tenant>/<username> authenticates that tenant's user; a plain username follows Login's rule", async () => {
      const { username, older, newer } = await twoSameNamed();
      const me = (user: string, password: string) =>
        clients(t, basic(user, password)).users.getCurrentUser({});
      expect((await me(`${newer.name}/${username}`, NEWER)).tenantId).toBe(newer.id);
      expect((await me(`${newer.id}/${username}`, NEWER)).tenantId).toBe(newer.id);
      expect((await me(`${older.name}/${username}`, OLDER)).tenantId).toBe(older.id);
      const wrong = await refusal(me(username, "not the password at all"));
      expect(wrong.code).toBe(Code.Unauthenticated);
      expect(wrong.reason).toBe("CREDENTIALS_INVALID");
      expect(await refusal(me(username, OLDER))).toEqual(wrong);
      expect(await refusal(me(`${older.name}/${username}`, NEWER))).toEqual(wrong);
      expect(await refusal(me(`no-such-tenant-${short()}/${username}`, OLDER))).toEqual(wrong);
      await ts.app.storage.em
        .fork()
        .nativeUpdate(User, { username, tenantId: older.id }, { tenantlessLogin: true });
      expect((await me(username, OLDER)).tenantId).toBe(older.id);
      expect(await refusal(me(username, NEWER))).toEqual(wrong);
    });
  });

  it("a tenant admin's rename of its own tenant is ACCESS_DENIED whether or not the name is taken", async () => {
    const mine = await tenantWithAdmin(t, root, ["admin:tenants"]);
    const other = await tenantWithAdmin(t, root, ["admin:tenants"]);
    const rename = (name: string) =>
      clients(t, mine.token).tenants.updateTenant({ id: mine.tenant.id, name });
    const taken = await refusal(rename(other.tenant.name));
    const free = await refusal(rename(`tenant-${short()}`));
    expect(taken).toEqual(free);
    expect(taken.code).toBe(Code.PermissionDenied);
    expect(taken.reason).toBe("ACCESS_DENIED");
    // A `*` caller still renames (a free name), and is told when a name is taken.
    const renamed = await clients(t, root).tenants.updateTenant({
      id: mine.tenant.id,
      name: `tenant-${short()}`,
    });
    expect(renamed.tenant?.id).toBe(mine.tenant.id);
    const clash = await refusal(
      clients(t, root).tenants.updateTenant({ id: mine.tenant.id, name: other.tenant.name }),
    );
    expect(clash.code).toBe(Code.AlreadyExists);
  });
});

describe.each(DATABASES)("per-tenant usernames under the password limits on $name", (db) => {
  let ts: TestServer;
  let t: Transport;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: {
        ...LIMITS_ON,
        authFailuresPerIpPerMinute: 1000,
        authFailuresPerUsernamePerIp: 3,
        authFailuresPerUsernamePerHour: 1000,
      },
    });
    t = ts.connect();
    root = await adminLogin(t);
  });
  afterAll(async () => {
    await ts.close();
  });

  it("a lockout of one tenant's user does not lock out a same-named user of another tenant", async () => {
    const a = await tenantWithAdmin(t, root, ["admin:users"]);
    const b = await tenantWithAdmin(t, root, ["admin:users"]);
    const username = `same-${short()}`;
    await clients(t, root).users.createUser({ username, password: PASSWORD, tenantId: a.tenant.id });
    await clients(t, root).users.createUser({ username, password: PASSWORD, tenantId: b.tenant.id });
    const login = (tenant: string, password: string) =>
      createClient(UserService, t).login({ username, password, tenant });
    for (let i = 0; i < 3; i++)
      expect((await refusal(login(a.tenant.name, "not the password at all"))).reason).toBe(
        "CREDENTIALS_INVALID",
      );
    // Tenant a's user is locked out of this address, even with the right password...
    expect((await refusal(login(a.tenant.name, PASSWORD))).reason).toBe("RATE_LIMITED");
    // ...tenant b's is not, by Login or by HTTP Basic.
    expect((await login(b.tenant.name, PASSWORD)).user?.tenantId).toBe(b.tenant.id);
    const me = await clients(t, basic(`${b.tenant.name}/${username}`, PASSWORD)).users.getCurrentUser({});
    expect(me.tenantId).toBe(b.tenant.id);
  });
});
