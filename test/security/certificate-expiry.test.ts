import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../errors-util.js";
import { DATABASES, pinnableClock, startTestServer, type TestServer } from "../helpers.js";
import {
  adminClients,
  authenticatedAs,
  boundMachineUser,
  type ClientPem,
  connectedWithCertificate,
  mintClientCertificate,
  short,
} from "../machine-fixtures.js";

/**
 * mTLS is checked at the handshake, and an HTTP/2 connection can stay open for as long as its
 * client keeps it busy: a client certificate must stop authenticating on the connections it
 * already has once it expires, as a revoked one does.
 */

describe.each(DATABASES)("a client certificate expiring under an open connection on $name", (db) => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  it("stops authenticating on the same connection once its notAfter passes, and a renewed certificate is accepted", async () => {
    const clock = pinnableClock();
    ts = await startTestServer(db, { server: { mtls: "optional" } }, undefined, { clock: clock.now });
    const admin = await adminClients(ts);
    const expiring = await mintClientCertificate(ts, 1);
    const renewed = await mintClientCertificate(ts);
    expect(renewed.notAfter).toBeGreaterThan(expiring.notAfter);
    const machineId = await boundMachineUser(admin, `backend-${short()}`, expiring.fingerprint);
    await admin.machines.bindCertificate({
      machineUserId: machineId,
      identity: { case: "sha256Fingerprint", value: renewed.fingerprint },
    });

    const connected = (pem: ClientPem) => connectedWithCertificate(ts!, pem);
    const outcome = authenticatedAs;
    let handshakes = 0;
    const counted = () => handshakes++;
    ts.server.server.on("secureConnection", counted);
    const open = await connected(expiring);
    try {
      expect(await outcome(open.client.checkAuthentication({}))).toBe(machineId);
      // Its last valid instant (X.509's notAfter is inclusive).
      clock.pin(expiring.notAfter);
      expect(await outcome(open.client.checkAuthentication({}))).toBe(machineId);

      clock.pin(expiring.notAfter + 1);
      const r = await outcome(open.client.checkAuthentication({}));
      expect(r, "an expired certificate authenticated its open connection's next request").not.toBeTypeOf(
        "string",
      );
      expect(r).toMatchObject({ code: Code.Unauthenticated, reason: "AUTH_REQUIRED" });
      expect(handshakes, "every call of the expired certificate on its one connection").toBe(1);
      // The connection stays up: it just authenticates nothing by that certificate.
      expect(open.sessionManager.state()).not.toBe("error");

      // The renewed certificate, still valid then, authenticates on a connection of its own.
      const next = await connected(renewed);
      try {
        expect(await outcome(next.client.checkAuthentication({}))).toBe(machineId);
      } finally {
        next.sessionManager.abort();
      }
    } finally {
      ts.server.server.off("secureConnection", counted);
      open.sessionManager.abort();
    }
  });
});
