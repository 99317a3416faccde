import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterEach, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { createClientCertificate } from "../../src/certs/dev-ca.js";
import { Code } from "../errors-util.js";
import { DATABASES, pinnableClock, startTestServer, type TestServer } from "../helpers.js";
import {
  adminLogin,
  authenticatedAs,
  clients,
  connectedWithCertificate,
  short,
} from "../machine-fixtures.js";

/**
 * mTLS is checked at the handshake, and an HTTP/2 connection can stay open for as long as its
 * client keeps it busy: a client certificate must stop authenticating on the connections it
 * already has once it expires, as a revoked one does.
 */

interface Pem {
  cert: Buffer;
  key: Buffer;
  fingerprint: string;
  /** Its notAfter, ms since the epoch. */
  notAfter: number;
}

async function mint(ts: TestServer, validityDays?: number): Promise<Pem> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-expiry-")), "backend");
  await createClientCertificate(
    ts.certs.dir,
    `backend-${short()}`,
    out,
    validityDays ? { validityDays } : {},
  );
  const cert = readFileSync(join(out, "client.crt"));
  const parsed = new X509Certificate(cert);
  return {
    cert,
    key: readFileSync(join(out, "client.key")),
    fingerprint: parsed.fingerprint256.replace(/:/g, "").toLowerCase(),
    notAfter: Date.parse(parsed.validTo),
  };
}

describe.each(DATABASES)("a client certificate expiring under an open connection on $name", (db) => {
  let ts: TestServer | undefined;
  afterEach(async () => {
    await ts?.close();
    ts = undefined;
  });

  it("stops authenticating on the same connection once its notAfter passes, and a renewed certificate is accepted", async () => {
    const clock = pinnableClock();
    ts = await startTestServer(db, { server: { mtls: "optional" } }, undefined, { clock: clock.now });
    const plain = createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca },
    });
    const admin = clients(plain, await adminLogin(plain));
    const machine = (
      await admin.machines.createMachineUser({ name: `backend-${short()}`, authType: MachineAuthType.BEARER })
    ).machineUser!;
    const expiring = await mint(ts, 1);
    const renewed = await mint(ts);
    expect(renewed.notAfter).toBeGreaterThan(expiring.notAfter);
    for (const pem of [expiring, renewed])
      await admin.machines.bindCertificate({
        machineUserId: machine.id,
        identity: { case: "sha256Fingerprint", value: pem.fingerprint },
      });

    const connected = (pem: Pem) => connectedWithCertificate(ts!, pem);
    const outcome = authenticatedAs;
    let handshakes = 0;
    const counted = () => handshakes++;
    ts.server.server.on("secureConnection", counted);
    const open = await connected(expiring);
    try {
      expect(await outcome(open.client.checkAuthentication({}))).toBe(machine.id);
      // Its last valid instant (X.509's notAfter is inclusive).
      clock.pin(expiring.notAfter);
      expect(await outcome(open.client.checkAuthentication({}))).toBe(machine.id);

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
        expect(await outcome(next.client.checkAuthentication({}))).toBe(machine.id);
      } finally {
        next.sessionManager.abort();
      }
    } finally {
      ts.server.server.off("secureConnection", counted);
      open.sessionManager.abort();
    }
  });
});
