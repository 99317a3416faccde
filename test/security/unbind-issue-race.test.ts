import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { createClientCertificate } from "../../src/certs/dev-ca.js";
import { rejection } from "../errors-util.js";
import { createTestCerts, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * UnbindCertificate ends the access tokens the certificate obtained (their cut-off is the
 * unbinding's second). An IssueAccessToken whose certificate was authenticated before the
 * unbinding committed, and that reads the machine user after it, waits out the cut-off's
 * second (it never issues in a rotation's second) and so signed a token after it: bound to a
 * certificate no longer bound, it authenticated for its whole lifetime. The interleaving is
 * forced, not hoped for: the test's hook on the per-principal limiter (counted after
 * authentication, before the handler) runs the whole unbinding (committed) first.
 */
describe.each(DATABASES)("an unbinding racing the certificate's IssueAccessToken ($name)", (db) => {
  let ts: TestServer;
  let admin: ReturnType<typeof clients>;
  let tenantId: string;

  beforeAll(async () => {
    // Rate limits on: the per-principal count is where the hook sits.
    ts = await startTestServer(
      db,
      { server: { mtls: "optional" }, rateLimit: { enabled: true } },
      await createTestCerts("unused"),
    );
    admin = clients(over(), await adminLogin(over()));
    tenantId = (await admin.tenants.createTenant({ name: `race-${short()}` })).tenant!.id;
  });
  afterAll(async () => {
    await ts?.close();
  });

  function over(folder?: { cert: Buffer; key: Buffer }): Transport {
    return createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca, ...(folder ? { cert: folder.cert, key: folder.key } : {}) },
    });
  }

  it("issues no token that outlives an unbinding committed after the certificate authenticated", async () => {
    const mu = (
      await admin.machines.createMachineUser({
        tenantId,
        name: `raced-${short()}`,
        authType: MachineAuthType.BEARER,
      })
    ).machineUser!;
    const out = join(mkdtempSync(join(tmpdir(), "tessera-backend-")), "raced");
    await createClientCertificate(ts.certs.dir, "raced", out);
    const folder = {
      cert: readFileSync(join(out, "client.crt")),
      key: readFileSync(join(out, "client.key")),
    };
    const fingerprint = new X509Certificate(folder.cert).fingerprint256.replace(/:/g, "").toLowerCase();
    const { binding } = await admin.machines.bindCertificate({
      machineUserId: mu.id,
      identity: { case: "sha256Fingerprint", value: fingerprint },
    });
    const withCert = over(folder);
    const machines = createClient(MachineUserService, withCert);

    // The hook: the certificate's IssueAccessToken, authenticated and counted, first lets the
    // unbinding run to its commit.
    const limiter = ts.app.limits!.perPrincipal;
    const consume = limiter.consume.bind(limiter);
    let unbound = false;
    limiter.consume = async (key: string) => {
      if (key === `machine:${mu.id}`) {
        limiter.consume = consume;
        await admin.machines.unbindCertificate({
          machineUserId: mu.id,
          identity: { case: "bindingId", value: binding!.id },
        });
        unbound = true;
      }
      return consume(key);
    };
    let outcome: string | ConnectError;
    try {
      outcome = await machines.issueAccessToken({}).then(
        (r) => r.accessToken,
        (e: unknown) => ConnectError.from(e),
      );
    } finally {
      limiter.consume = consume;
    }
    expect(unbound).toBe(true);
    // A token issued anyway must at least authenticate nothing (it did, for its lifetime).
    if (typeof outcome === "string")
      expect((await rejection(clients(withCert, outcome).machines.checkAuthentication({}))).reason).toBe(
        "TOKEN_REVOKED",
      );
    // Refused: the certificate it would be bound to is no longer bound.
    expect(outcome).toBeInstanceOf(ConnectError);
    expect((await rejection(Promise.reject(outcome))).reason).toBe("TOKEN_REVOKED");
  });
});
