import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineUser } from "../src/storage/machine-entities.js";
import { DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, authenticates, bearerMachine, clients } from "./machine-fixtures.js";

/**
 * A credential rotation racing a revocation of the machine user's access tokens (issue 22):
 * the rotation reads the row, hashes the new secret, then writes its cut-off; a revocation
 * (POST /oauth2/revoke of a machine access token) that commits in between must stand. The
 * interleaving is forced, not hoped for: the rotation's credential-creation budget is
 * counted between its read and its write, and the test's hook on that limiter runs the
 * whole revocation (committed) before letting the rotation go on.
 */
describe.each(DATABASES)("a rotation racing a machine-token revocation ($name)", (db) => {
  let ts: TestServer;
  let agent: Agent;
  let root: string;

  beforeAll(async () => {
    // Rate limits on: the rotation counts its credential creation (where the hook sits).
    ts = await startTestServer(db, { rateLimit: { enabled: true } });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
    root = await adminLogin(ts.connect());
  });
  afterAll(async () => {
    await agent?.close();
    await ts?.close();
  });

  /** POST /oauth2/revoke of `token`, the machine user authenticating with its own credential. */
  async function revoke(credential: string, token: string): Promise<number> {
    const res = await request(`${ts.server.url}/oauth2/revoke`, {
      method: "POST",
      dispatcher: agent,
      headers: {
        "content-type": "application/x-www-form-urlencoded",
        authorization: `Bearer ${credential}`,
      },
      body: new URLSearchParams({ token }).toString(),
    });
    await res.body.text();
    return res.statusCode;
  }

  /** Whether `token` authenticates a call now. */
  const works = (token: string) => authenticates(ts.connect(), token);

  it("keeps the revocation's cut-off when the revocation commits between the rotation's read and its write", async () => {
    const admin = clients(ts.connect(), root);
    const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
    const accessToken = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
    expect(await works(accessToken)).toBe(true);

    // The hook: the rotation's credential-creation count, after it read the row and before it
    // writes, runs the revocation to its commit first.
    const limiter = ts.app.limits!.credentialCreations;
    const consume = limiter.consume.bind(limiter);
    let revokedInBetween = 0;
    limiter.consume = async (key: string) => {
      limiter.consume = consume;
      revokedInBetween = await revoke(credential, accessToken);
      return consume(key);
    };
    let rotated: Awaited<ReturnType<typeof admin.machines.rotateMachineUserCredentials>>;
    try {
      // A long grace period: written over the revocation, it would bring the token back for an hour.
      rotated = await admin.machines.rotateMachineUserCredentials({
        id: machine.id,
        gracePeriodSeconds: 3600,
      });
    } finally {
      limiter.consume = consume;
    }
    expect(revokedInBetween).toBe(200);

    // The revoked token stays refused, on the row and on the wire.
    const row = await ts.app.storage.em.fork().findOneOrFail(MachineUser, { id: machine.id });
    expect(row.rotationGraceUntil!.getTime()).toBeLessThanOrEqual(Date.now());
    expect(await works(accessToken)).toBe(false);
    // The rotation itself took effect: the previous credential lives out its grace period, the new one works.
    expect(rotated.previousCredentialsExpireAt).toBeDefined();
    const fresh = (await clients(ts.connect(), rotated.token).machines.issueAccessToken({})).accessToken;
    expect(await works(fresh)).toBe(true);
  });

  it("keeps the earlier cut-off when the revocation commits after the rotation", async () => {
    const admin = clients(ts.connect(), root);
    const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
    const accessToken = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
    await admin.machines.rotateMachineUserCredentials({ id: machine.id, gracePeriodSeconds: 3600 });
    // Within the grace period both the old credential and its token still work, until revoked.
    expect(await works(accessToken)).toBe(true);
    expect(await revoke(credential, accessToken)).toBe(200);
    expect(await works(accessToken)).toBe(false);
  });
});
