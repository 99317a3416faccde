import { ConnectError } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineUser } from "../../src/storage/machine-entities.js";
import { rejection } from "../errors-util.js";
import { DATABASES, pinnableClock, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basic, basicMachine, bearerMachine, clients } from "../machine-fixtures.js";
import { aSecondAhead, issueOutcome, machineOutcome, signingAfter } from "./fixtures.js";

/**
 * Machine access-token cut-offs, over TLS, each interleaving forced (pinned clock, one-shot hooks).
 */
describe.each(DATABASES)("machine access-token cut-offs ($name)", (db) => {
  let ts: TestServer;
  let root: string;
  const clock = pinnableClock();

  beforeAll(async () => {
    ts = await startTestServer(db, {}, undefined, { clock: clock.now });
    root = await adminLogin(ts.connect());
  });
  afterAll(async () => {
    await ts?.close();
  });
  afterEach(() => clock.release());

  const outcome = (token: string) => machineOutcome(ts.connect(), token);

  /**
   * Disabling a machine user ends the access tokens it was issued, for good, as disabling a
   * user ends its sessions: re-enabling it restores its credentials, not the tokens issued
   * before the disable (else an access token taken from a machine that was disabled because of
   * it comes back with the machine, for up to one access-token lifetime). Over TLS.
   */
  describe("a machine user's disable ends its access tokens", () => {
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

    // A call authenticated before the disable committed, signing after it, a second later: the
    // token would bear a later second than the cut-off, and work again once re-enabled. Forced:
    // the test's hook on the signature runs the disable (committed) first.
    it("issues no token signed after a disable that committed since its credential authenticated", async () => {
      const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
      const admin = clients(ts.connect(), root).machines;
      const second = aSecondAhead();
      clock.pin(second);
      const { outcome: made, ran: disabled } = await signingAfter(
        ts,
        machine.id,
        async () => {
          await admin.updateMachineUser({ id: machine.id, disabled: true });
          clock.pin(second + 1000);
        },
        () => issueOutcome(ts.connect(), credential),
      );
      expect(disabled).toBe(true);
      await admin.updateMachineUser({ id: machine.id, disabled: false });
      if (typeof made === "string")
        expect(await outcome(made), "a token signed after the disable came back with the re-enable").not.toBe(
          "ok",
        );
      expect(made).toBeInstanceOf(ConnectError);
      expect((await rejection(Promise.reject(made))).reason).toBe("PRINCIPAL_DISABLED");
    });

    // A token signed between the disable's clock read and its commit, a second later. Forced:
    // the test's hook on the disable's write of the cut-off obtains a token first. SQLite has
    // one connection: the token's call reads inside the disable's transaction and is refused, so
    // the interleaving exists on PostgreSQL only.
    it.runIf(db.name === "postgres")(
      "ends a token signed while the disable was being committed, a second later",
      async () => {
        const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
        const admin = clients(ts.connect(), root).machines;
        const second = aSecondAhead();
        clock.pin(second);
        const driver = ts.app.storage.em.getDriver();
        const nativeUpdate = driver.nativeUpdate.bind(driver);
        let obtained: string | undefined;
        driver.nativeUpdate = (async (...args: Parameters<typeof nativeUpdate>) => {
          const [, where, data] = args;
          if ((where as { id?: string }).id === machine.id && "rotationGraceUntil" in (data as object)) {
            driver.nativeUpdate = nativeUpdate;
            clock.pin(second + 1000);
            obtained = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
          }
          return nativeUpdate(...args);
        }) as typeof nativeUpdate;
        try {
          await admin.updateMachineUser({ id: machine.id, disabled: true });
        } finally {
          driver.nativeUpdate = nativeUpdate;
        }
        expect(obtained, "a token was obtained while the disable was on its way").toBeDefined();
        await admin.updateMachineUser({ id: machine.id, disabled: false });
        expect(
          await outcome(obtained!),
          "a token signed before the disable committed came back with the re-enable",
        ).toBe("TOKEN_REVOKED");
      },
    );

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

  /**
   * `POST /oauth2/revoke` of a machine's access token ends every token the machine user was
   * issued up to the revocation (cut-off: `iat` up to its second). A token signed between the
   * revocation's clock read and its write's commit, in a later second, was issued before the
   * revocation took effect, yet outlived it. The interleaving is forced: the test's hook on the
   * revocation's write obtains a token first, and the test's clock is pinned so that the second
   * changes there.
   */
  describe("a machine token signed while /oauth2/revoke commits", () => {
    it("ends a token signed between the revocation's clock read and its commit, a second later", async () => {
      const { machine, username, password } = await basicMachine(ts.connect(), root, []);
      const credential = basic(username, password);
      const second = aSecondAhead();
      clock.pin(second);
      const revoked = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;

      // Before the revocation's write of the machine user's cut-off: a token, a second later.
      const storage = ts.app.storage;
      const fork = storage.em.fork.bind(storage.em);
      let obtained: string | undefined;
      storage.em.fork = ((...args: Parameters<typeof fork>) => {
        const em = fork(...args);
        const nativeUpdate = em.nativeUpdate.bind(em);
        em.nativeUpdate = (async (entity: unknown, where: unknown, data: unknown, ...rest: unknown[]) => {
          const ours =
            entity === MachineUser &&
            (where as { id?: string }).id === machine.id &&
            "rotationGraceUntil" in (data as object);
          if (ours && obtained === undefined) {
            storage.em.fork = fork;
            clock.pin(second + 1000);
            obtained = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
          }
          return (nativeUpdate as (...a: unknown[]) => Promise<number>)(entity, where, data, ...rest);
        }) as typeof em.nativeUpdate;
        return em;
      }) as typeof fork;

      const agent = new Agent({ connect: { ca: ts.certs.ca } });
      try {
        const res = await request(`${ts.server.url}/oauth2/revoke`, {
          method: "POST",
          dispatcher: agent,
          headers: { "content-type": "application/x-www-form-urlencoded", ...credential },
          body: new URLSearchParams({ token: revoked }).toString(),
        });
        await res.body.text();
        expect(res.statusCode).toBe(200);
      } finally {
        storage.em.fork = fork;
        await agent.close();
      }
      expect(obtained, "a token was obtained while the revocation was on its way").toBeDefined();
      expect(await outcome(revoked)).toBe("TOKEN_REVOKED");
      expect(await outcome(obtained!), "a token signed before the revocation committed outlived it").toBe(
        "TOKEN_REVOKED",
      );
      // The credential stays: what it obtains now works.
      clock.pin(second + 2000);
      const after = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
      expect(await outcome(after)).toBe("ok");
    });
  });
});
