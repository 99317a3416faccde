import { randomUUID } from "node:crypto";
import type { Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { Code, rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basic, clients, tenantWithAdmin } from "../machine-fixtures.js";

/**
 * Existence oracles (issue #18, item 10; certificate bindings are tested with their own
 * class): over TLS, what an attacker learns from a refusal must not depend on whether
 * something exists in another tenant, or on whether a guessed password of a disabled
 * account was right.
 */

const PASSWORD = "correct horse battery staple";
const short = () => randomUUID().slice(0, 8);

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
    const me = (password: string) => clients(t, basic(b.username, password)).users.getCurrentUser({});
    const right = await refusal(me("tenant admin password"));
    const wrong = await refusal(me("not the password at all"));
    expect(right).toEqual(wrong);
    expect(right.reason).toBe("CREDENTIALS_INVALID");
  });

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
});
