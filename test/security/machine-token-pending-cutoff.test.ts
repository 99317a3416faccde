// A rotation that replaces a cut-off still in its grace period, past the rotating instance's
// window (its access-token lifetime), must not extend or revive what that cut-off ends: the
// tokens another instance issued with a longer lifetime (found by the merge review of w-rmach).
import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { createTestCerts, POSTGRES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, bearerMachine, clients } from "../machine-fixtures.js";

describe("a pending machine-token cut-off replaced by a later rotation (PostgreSQL, two instances with different lifetimes)", () => {
  let long: TestServer;
  let short: TestServer;
  let verifier: string;
  let root: string;
  let offset = 0;
  const now = () => Date.now() + offset;
  const url = POSTGRES.url();

  beforeAll(async () => {
    const db = { name: "postgres" as const, url: () => url };
    const certs = await createTestCerts();
    long = await startTestServer(db, { auth: { jwt: { accessTokenTtl: 3600 } } }, certs, { clock: now });
    short = await startTestServer(db, { auth: { jwt: { accessTokenTtl: 60 } } }, certs, { clock: now });
    root = await adminLogin(long.connect());
    verifier = (
      await clients(long.connect(), root).machines.createMachineUser({
        name: "verifier",
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
  });
  afterAll(async () => {
    await short?.close();
    await long?.close();
  });
  const codes = (credential: string) =>
    Promise.all(
      [long, short].map(async (ts) => {
        const v = createClient(
          VerificationService,
          withHeaders(ts.connect(), { authorization: `Bearer ${verifier}` }),
        );
        return VerificationCode[(await v.verifyCredential({ credential })).code];
      }),
    );

  it("ends a pre-rotation token no later than its rotation's grace period", async () => {
    offset = 0;
    const { machine, token } = await bearerMachine(long.connect(), root, []);
    const jwt = (await clients(long.connect(), token).machines.issueAccessToken({})).accessToken;
    await clients(long.connect(), root).machines.rotateMachineUserCredentials({
      id: machine.id,
      gracePeriodSeconds: 300,
    });
    offset = 200_000; // past short's window (60 + 30 s), within A's grace
    expect(await codes(jwt)).toEqual(["VALID", "VALID"]);
    await clients(short.connect(), await adminLogin(short.connect())).machines.rotateMachineUserCredentials({
      id: machine.id,
      gracePeriodSeconds: 600,
    });
    offset = 400_000; // A's grace period (300 s) is over
    expect(await codes(jwt)).toEqual(["REVOKED", "REVOKED"]);
  });

  it("never brings back a token ended while a rotation that began before the end waited for the row", async () => {
    offset = 0;
    const { machine, token } = await bearerMachine(long.connect(), root, []);
    const jwt = (await clients(long.connect(), token).machines.issueAccessToken({})).accessToken;
    await clients(long.connect(), root).machines.rotateMachineUserCredentials({
      id: machine.id,
      gracePeriodSeconds: 300,
    });
    offset = 299_000; // 1 s before A's grace period ends
    const shortAdmin = clients(short.connect(), await adminLogin(short.connect())).machines;
    // Another writer holds the row (any slow transaction on it) while the rotation starts.
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    let locked!: () => void;
    const isLocked = new Promise<void>((r) => {
      locked = r;
    });
    const holder = long.app.storage.em.fork().transactional(async (tx) => {
      await tx
        .getConnection()
        .execute(
          "select id from machine_users where id = ? for update",
          [machine.id],
          "all",
          tx.getTransactionContext(),
        );
      locked();
      await gate;
    });
    await isLocked;
    const rotation = shortAdmin.rotateMachineUserCredentials({ id: machine.id, gracePeriodSeconds: 600 });
    await new Promise((r) => setTimeout(r, 500));
    offset = 305_000; // A's grace period is over: the token is ended
    const ended = await codes(jwt);
    release();
    await holder;
    await rotation;
    const after = await codes(jwt);
    expect(ended).toEqual(["REVOKED", "REVOKED"]);
    expect(after, "the token A ended verifies again").toEqual(["REVOKED", "REVOKED"]);
  });
});
