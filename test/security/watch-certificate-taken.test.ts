import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { RevocationKind, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";
import { type Backend, mintBackend } from "./fixtures.js";

/**
 * The review of 2026-12-06 (cert-review): a WatchRevocations stream authenticated by a
 * client certificate alone kept running after another binding took that certificate (its
 * fingerprint bound to another machine user of the tenant, or bound in another tenant),
 * because the events of that change name the other machine user, perhaps in a tenant the
 * stream never sees, while a new request with the certificate no longer authenticated as
 * the caller. The stream kept sending the tenant's revocations to a holder that was no
 * longer the machine user granted auth:verify.
 */

function presenting(ts: TestServer, backend: Backend): Transport {
  return createConnectTransport({
    baseUrl: ts.server.url,
    httpVersion: "2",
    nodeOptions: { ca: ts.certs.ca, cert: backend.cert, key: backend.key },
  });
}

async function whoAmI(ts: TestServer, backend: Backend): Promise<string> {
  try {
    return (await createClient(MachineUserService, presenting(ts, backend)).checkAuthentication({}))
      .machineUserId;
  } catch (err) {
    return (await rejection(Promise.reject(err))).reason ?? "";
  }
}

describe.each(DATABASES)("a certificate-authenticated WatchRevocations stream on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let root: string;
  let tenant: Awaited<ReturnType<typeof tenantWithAdmin>>;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      server: { mtls: "optional" },
      verification: { watchHeartbeatSeconds: 1 },
    });
    transport = ts.connect();
    root = await adminLogin(transport);
    tenant = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
  });
  afterAll(async () => {
    await ts.close();
  });

  /** A watcher machine user of the tenant, its certificate bound by SAN URI (unproven), and its open stream. */
  async function watching() {
    const san = `spiffe://tenant.example/watcher/${short()}`;
    const { machine } = await bearerMachine(transport, root, [tenant.application.id], {
      tenantId: tenant.tenant.id,
      scopes: ["auth:verify"],
    });
    const backend = await mintBackend(ts, san);
    await clients(transport, root).machines.bindCertificate({
      machineUserId: machine!.id,
      identity: { case: "sanUri", value: san },
    });
    expect(await whoAmI(ts, backend)).toBe(machine!.id);
    const watcher = new Watcher(createClient(VerificationService, presenting(ts, backend)));
    await watcher.first();
    return { machine: machine!, backend, watcher };
  }

  async function expectEnded(watcher: Watcher): Promise<void> {
    const ended = await watcher.end(5_000);
    expect(ended, "the stream kept running after its certificate was taken").toBeInstanceOf(ConnectError);
    expect((ended as ConnectError).code).toBe(Code.Unavailable);
  }

  it("ends once the certificate's fingerprint is bound to another machine user of its tenant", async () => {
    const { backend, watcher } = await watching();
    try {
      const { machine: other } = await bearerMachine(transport, root, [tenant.application.id], {
        tenantId: tenant.tenant.id,
      });
      await clients(transport, root).machines.bindCertificate({
        machineUserId: other!.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      expect(await whoAmI(ts, backend)).toBe(other!.id);
      await expectEnded(watcher);
    } finally {
      watcher.close();
    }
  });

  it("ends once another tenant binds the certificate's fingerprint (it then authenticates no one)", async () => {
    const { backend, watcher } = await watching();
    try {
      const other = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
      const { machine: theirs } = await bearerMachine(transport, other.token, [other.application.id]);
      await clients(transport, other.token).machines.bindCertificate({
        machineUserId: theirs!.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      expect(await whoAmI(ts, backend)).toBe("AUTH_REQUIRED");
      await expectEnded(watcher);
    } finally {
      watcher.close();
    }
  });

  it("keeps running through binding changes that leave the certificate its caller's", async () => {
    const { watcher } = await watching();
    try {
      const { machine: other } = await bearerMachine(transport, root, [tenant.application.id], {
        tenantId: tenant.tenant.id,
      });
      // Another certificate bound to another machine user, in the tenant and in another one.
      const unrelated = await mintBackend(ts, `spiffe://tenant.example/other/${short()}`);
      await clients(transport, root).machines.bindCertificate({
        machineUserId: other!.id,
        identity: { case: "sha256Fingerprint", value: unrelated.fingerprint },
      });
      // The stream re-resolved its certificate at this event and carried on.
      await watcher.event(RevocationKind.SUBJECT, other!.id);
      const before = watcher.messages.length;
      await watcher.until(() => watcher.messages.length > before + 1, 5_000, "two heartbeats");
      expect(watcher.ended).toBeUndefined();
    } finally {
      watcher.close();
    }
  });
});
