import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { pinnableClock, sharedInstances, type TestServer } from "../helpers.js";
import {
  adminLogin,
  bearerMachine,
  clients,
  verificationCodes,
  verifierMachine,
} from "../machine-fixtures.js";
import { pgHolds } from "../pg-holds.js";

/**
 * A machine access token ended by a revocation (a disable) or by a rotation whose grace period
 * is over stays ended when a later rotation with a grace period replaces the cut-off, even
 * where the rotating instance counts a shorter access-token lifetime than the token was issued
 * with (two instances on one PostgreSQL schema during a rolling change of
 * `auth.jwt.accessTokenTtl`, or one restarted with a lower one). The rotation used to keep the
 * earlier cut-off only within its own lifetime of it, so the token verified again until the new
 * grace period ended. Over TLS, each answer from VerifyCredential on both instances.
 */
describe.each(["sqlite", "postgres"] as const)(
  "machine access tokens ended before a rotation stay ended (%s, two instances)",
  (kind) => {
    let long: TestServer;
    let short: TestServer;
    let verifier: string;
    let root: string;
    const clock = pinnableClock();
    const servers = sharedInstances(
      kind,
      [{ auth: { jwt: { accessTokenTtl: 3600 } } }, { auth: { jwt: { accessTokenTtl: 60 } } }],
      { clock: clock.now },
    );

    beforeAll(async () => {
      [long, short] = servers as [TestServer, TestServer];
      root = await adminLogin(long.connect());
      verifier = await verifierMachine(long.connect(), root);
    });
    afterEach(() => clock.release());

    const codes = (credential: string) => verificationCodes([long, short], verifier, credential);

    /**
     * A machine access token issued on the long-lived instance, then its machine user's
     * credentials rotated there with a 300 s grace period, from `start`.
     */
    async function tokenRotatedWithGrace() {
      const { machine, token } = await bearerMachine(long.connect(), root, []);
      const jwt = (await clients(long.connect(), token).machines.issueAccessToken({})).accessToken;
      const start = Date.now();
      await clients(long.connect(), root).machines.rotateMachineUserCredentials({
        id: machine.id,
        gracePeriodSeconds: 300,
      });
      return { machine, jwt, start };
    }

    /** A rotation with a 600 s grace period on the short-lived instance. */
    const rotateOnShort = async (id: string) =>
      clients(short.connect(), await adminLogin(short.connect())).machines.rotateMachineUserCredentials({
        id,
        gracePeriodSeconds: 600,
      });

    it("does not bring back a token a disable ended", async () => {
      const admin = clients(long.connect(), root).machines;
      const { machine, token } = await bearerMachine(long.connect(), root, []);
      const jwt = (await clients(long.connect(), token).machines.issueAccessToken({})).accessToken;
      expect(await codes(jwt)).toEqual(["VALID", "VALID"]);
      await admin.updateMachineUser({ id: machine.id, disabled: true });
      await admin.updateMachineUser({ id: machine.id, disabled: false });
      expect(await codes(jwt)).toEqual(["REVOKED", "REVOKED"]);

      // Past the short instance's access-token lifetime (and clock skew), within the token's.
      clock.pin(Date.now() + 120_000);
      await rotateOnShort(machine.id);
      expect(await codes(jwt), "the rotation's grace period revived a token the disable ended").toEqual([
        "REVOKED",
        "REVOKED",
      ]);
    });

    it("does not bring back a token an earlier rotation ended once its grace period was over", async () => {
      const admin = clients(long.connect(), root).machines;
      const { machine, token } = await bearerMachine(long.connect(), root, []);
      const jwt = (await clients(long.connect(), token).machines.issueAccessToken({})).accessToken;
      const first = await admin.rotateMachineUserCredentials({ id: machine.id, gracePeriodSeconds: 10 });
      clock.pin(Date.now() + 120_000);
      expect(await codes(jwt)).toEqual(["REVOKED", "REVOKED"]);

      await rotateOnShort(machine.id);
      expect(await codes(jwt), "the second rotation's grace period revived the first one's token").toEqual([
        "REVOKED",
        "REVOKED",
      ]);
      // What the first rotation issued (its credential, now in the second's grace period) still verifies.
      expect(await codes(first.token)).toEqual(["VALID", "VALID"]);
    });

    // A cut-off still in its grace period, replaced past the rotating instance's window, must
    // not stretch or revive what it ends (found by the merge review of w-rmach).
    it("ends a pre-rotation token no later than its rotation's grace period", async () => {
      const { machine, jwt, start } = await tokenRotatedWithGrace();
      clock.pin(start + 200_000); // past the short instance's window, within the grace period
      expect(await codes(jwt)).toEqual(["VALID", "VALID"]);
      await rotateOnShort(machine.id);
      clock.pin(start + 400_000); // the first grace period is over
      expect(await codes(jwt)).toEqual(["REVOKED", "REVOKED"]);
    });

    // PostgreSQL: a transaction of the test's holds the row while the rotation (its clock read) waits.
    it.runIf(kind === "postgres")(
      "never brings back a token ended while a rotation that began before the end waited for the row",
      async () => {
        const { machine, jwt, start } = await tokenRotatedWithGrace();
        const { waiterOn, hold } = pgHolds(() => long.app.storage.em.getConnection().getKnex());
        clock.pin(start + 299_000); // 1 s before the grace period ends
        const holder = await hold("select id from machine_users where id = ? for update", [machine.id]);
        let rotation!: Promise<unknown>;
        try {
          rotation = rotateOnShort(machine.id);
          await waiterOn(holder.pid);
          clock.pin(start + 305_000); // the grace period is over: the token is ended
          expect(await codes(jwt)).toEqual(["REVOKED", "REVOKED"]);
        } finally {
          await holder.release();
        }
        await rotation;
        expect(await codes(jwt), "the token the first rotation ended verifies again").toEqual([
          "REVOKED",
          "REVOKED",
        ]);
      },
    );
  },
);
