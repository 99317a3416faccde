import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RevocationKind } from "../../gen/tessera/v1/verification_service_pb.js";
import { sharedInstances, type TestServer } from "../helpers.js";
import {
  adminLogin,
  bearerMachine,
  clients,
  verificationCodes,
  verifierMachine,
} from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";

/**
 * `machine_users.tokens_revoked_before` ends machine access tokens like the rotation cut-off's
 * pair does, so a write of it alone (an operator's SQL, or code that sets it without the pair)
 * makes a revocation event too: a WatchRevocations client of another instance drops the
 * answers it keeps, and that instance's VerifyCredential refuses the token. Before, the
 * revocation-event trigger of machine_users did not list the column: no event, and SDK caches
 * kept accepting the token until it expired. Over TLS, two instances on one database.
 */
describe.each(["sqlite", "postgres"] as const)(
  "a write of a machine user's tokens_revoked_before alone (%s, two instances)",
  (kind) => {
    let one: TestServer;
    let two: TestServer;
    let root: string;
    let verifier: string;
    const watchers: Watcher[] = [];
    const servers = sharedInstances(kind, [{}, {}]);

    beforeAll(async () => {
      [one, two] = servers as [TestServer, TestServer];
      root = await adminLogin(one.connect());
      verifier = await verifierMachine(one.connect(), root);
    });
    afterAll(() => {
      for (const w of watchers) w.close();
    });

    it("makes a revocation event on the other instance's stream, whose VerifyCredential then refuses the token", async () => {
      const { machine, token } = await bearerMachine(one.connect(), root, []);
      const jwt = (await clients(one.connect(), token).machines.issueAccessToken({})).accessToken;
      const code = () => verificationCodes([two], verifier, jwt);
      expect(await code()).toEqual(["VALID"]);
      const watcher = Watcher.open(two.connect(), verifier);
      watchers.push(watcher);
      await watcher.first();

      // The column alone, written behind the service's back on the first instance's connection.
      await one.app.storage.em
        .getConnection()
        .getKnex()("machine_users")
        .where({ id: machine.id })
        // As the ORM stores it: a timestamp on PostgreSQL, milliseconds on SQLite.
        .update({ tokens_revoked_before: kind === "postgres" ? new Date() : Date.now() });

      await watcher.event(RevocationKind.SUBJECT, machine.id);
      expect(await code()).toEqual(["REVOKED"]);
    });
  },
);
