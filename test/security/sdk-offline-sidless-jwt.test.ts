import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { decodeJwt } from "jose";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { createTesseraAuth, type TesseraAuth, type TesseraAuthOptions } from "../../src/sdk/server/index.js";
import { clientFor, SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short, verifierMachine } from "../machine-fixtures.js";

/**
 * Tessera refuses a user access token without `sid` as an ended session's (every one it
 * mints names its session: only a leaked signing key makes one, and no session revocation
 * would end it). The SDK's offline path admitted one: signed with Tessera's own key, it
 * passed every check there. A machine user's access token names no session, and stays admitted.
 */
describe("SDK: a user access token without a session, verified offline", () => {
  let ts: TestServer;
  let tenantId: string;
  let verifier: string;
  let user: { id: string; username: string; password: string };
  const cores: TesseraAuth[] = [];

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    const root = await adminLogin(ts.connect());
    const admin = clients(ts.connect(), root);
    tenantId = (await admin.tenants.createTenant({ name: `sidless-${short()}` })).tenant!.id;
    verifier = await verifierMachine(ts.connect(), root, tenantId);
    const username = `u-${short()}`;
    const password = "sidless user password";
    const created = await admin.users.createUser({ tenantId, username, password, scopes: ["ticks:read"] });
    user = { id: created.user!.id, username, password };
  }, 120_000);

  afterEach(() => {
    for (const c of cores.splice(0)) c.close();
  });

  afterAll(async () => {
    await ts?.close();
  });

  function core(extra: Partial<TesseraAuthOptions> = {}): TesseraAuth {
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      ...extra,
    });
    cores.push(auth);
    return auth;
  }

  const login = async () =>
    (await createClient(UserService, ts.connect()).login({ ...user, tenant: tenantId })).accessToken;

  it("is refused TOKEN_REVOKED, as Tessera refuses it, without asking Tessera; a machine user's token is still admitted offline", async () => {
    // The service's clock runs 2 s behind until its stream is up, so that tokens issued
    // after that (whole-second `iat`) fall within what its revocation stream covers.
    let offset = -2000;
    const auth = core({ clockSkewSeconds: 0, now: () => Date.now() + offset });
    expect(await auth.ready(10_000)).toBe(true);
    offset = 0;
    // The tenant's first token is answered by Tessera (its wall learnt), the next offline: the path under test.
    await auth.authenticate(`Bearer ${await login()}`);
    const offline = auth.stats().offlineJwts;
    expect((await auth.authenticate(`Bearer ${await login()}`)).sessionId).toBeDefined();
    expect(auth.stats().offlineJwts).toBe(offline + 1);

    // What a holder of the signing key could mint: the user's token, naming no session.
    const sidless = (
      await ts.app.jwt.issue({
        subject: user.id,
        tenantId,
        scopes: ["ticks:read"],
        kind: "user",
        username: user.username,
      })
    ).token;
    expect(decodeJwt(sidless)).toMatchObject({ pk: "user", sub: user.id });
    expect(decodeJwt(sidless).sid).toBeUndefined();
    const asked = auth.stats().verifyCalls;
    const refusal = { reason: "TOKEN_REVOKED", message: "credential is revoked" };
    await expect(auth.authenticate(`Bearer ${sidless}`)).rejects.toMatchObject(refusal);
    expect(auth.stats().verifyCalls).toBe(asked);
    // The refusal a core asking Tessera for it gets.
    const online = core({ watch: false, jwt: { verify: "online" } });
    await expect(online.authenticate(`Bearer ${sidless}`)).rejects.toMatchObject(refusal);

    // A machine user's access token names no session either: admitted offline as before.
    const machineJwt = (await clientFor(MachineUserService, ts.connect(), verifier).issueAccessToken({}))
      .accessToken;
    expect(decodeJwt(machineJwt)).toMatchObject({ pk: "machine" });
    expect(decodeJwt(machineJwt).sid).toBeUndefined();
    const before = auth.stats().offlineJwts;
    expect((await auth.authenticate(`Bearer ${machineJwt}`)).kind).toBe("machine_user");
    expect(auth.stats().offlineJwts).toBe(before + 1);
  });
});
