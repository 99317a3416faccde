import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, bearerMachine, clients } from "../machine-fixtures.js";

/**
 * Disabling a machine user ends the access tokens it was issued, for good, as disabling a
 * user ends its sessions: re-enabling it restores its credentials, not the tokens issued
 * before the disable (else an access token taken from a machine that was disabled because of
 * it comes back with the machine, for up to one access-token lifetime). Over TLS.
 */
describe.each(DATABASES)("a machine user's disable ends its access tokens ($name)", (db) => {
  let ts: TestServer;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db);
    root = await adminLogin(ts.connect());
  });
  afterAll(async () => {
    await ts?.close();
  });

  /** The outcome of CheckAuthentication with `token`: "ok" or the refusal's reason. */
  function outcome(token: string): Promise<string> {
    return clients(ts.connect(), token)
      .machines.checkAuthentication({})
      .then(
        () => "ok",
        async (err: unknown) => (await rejection(Promise.reject(err))).reason ?? "no reason",
      );
  }

  it("does not bring back, on re-enable, a token issued before the disable", async () => {
    const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
    const admin = clients(ts.connect(), root).machines;
    const before = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
    expect(await outcome(before)).toBe("ok");

    await admin.updateMachineUser({ id: machine.id, disabled: true });
    expect(await outcome(before)).toBe("PRINCIPAL_DISABLED");
    await admin.updateMachineUser({ id: machine.id, disabled: false });

    expect(await outcome(before), "a token issued before the disable came back with the re-enable").toBe(
      "TOKEN_REVOKED",
    );
    // Its credential stays, and what it obtains now works.
    expect(await outcome(credential)).toBe("ok");
    const after = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
    expect(await outcome(after)).toBe("ok");
  });

  it("leaves the tokens alone when an update does not disable", async () => {
    const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
    const token = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
    await clients(ts.connect(), root).machines.updateMachineUser({ id: machine.id, disabled: false });
    await clients(ts.connect(), root).machines.updateMachineUser({
      id: machine.id,
      name: `${machine.name}-x`,
    });
    expect(await outcome(token)).toBe("ok");
  });
});
