import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { RevocationKind, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { DATABASES, withHeaders } from "../helpers.js";
import { bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";
import { certificateTenant, certificateUser, machineOutcome, mintBackend, presenting } from "./fixtures.js";

/**
 * The review of 2026-12-06 (cert-review): a WatchRevocations stream authenticated by a
 * client certificate alone kept running after another binding took that certificate (its
 * fingerprint bound to another machine user of the tenant, or bound in another tenant),
 * because the events of that change name the other machine user, perhaps in a tenant the
 * stream never sees, while a new request with the certificate no longer authenticated as
 * the caller. The stream kept sending the tenant's revocations to a holder that was no
 * longer the machine user granted auth:verify.
 */

describe.each(DATABASES)("a certificate-authenticated WatchRevocations stream on $name", (db) => {
  const c = certificateTenant(db, { verification: { watchHeartbeatSeconds: 1 } });

  /**
   * A watcher machine user of the tenant, its certificate bound by SAN URI (unproven), and its
   * open stream: authenticated by the certificate alone, or (`byToken`) by an access token the
   * certificate alone obtained, presented over it.
   */
  async function watching(byToken = false) {
    const san = `spiffe://tenant.example/watcher/${short()}`;
    const { machine } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
      tenantId: c.tenant.tenant.id,
      scopes: ["auth:verify"],
    });
    const backend = await mintBackend(c.ts, san);
    await clients(c.transport, c.root).machines.bindCertificate({
      machineUserId: machine!.id,
      identity: { case: "sanUri", value: san },
    });
    expect(await certificateUser(c.ts, backend)).toBe(machine!.id);
    let over = presenting(c.ts, backend);
    let token = "";
    if (byToken) {
      token = (await createClient(MachineUserService, over).issueAccessToken({})).accessToken;
      over = withHeaders(over, { authorization: `Bearer ${token}` });
    }
    const watcher = new Watcher(createClient(VerificationService, over));
    await watcher.first();
    return { machine: machine!, backend, watcher, token };
  }

  async function expectEnded(watcher: Watcher): Promise<void> {
    const ended = await watcher.end(5_000);
    expect(ended, "the stream kept running after its certificate was taken").toBeInstanceOf(ConnectError);
    expect((ended as ConnectError).code).toBe(Code.Unavailable);
  }

  it("ends once the certificate's fingerprint is bound to another machine user of its tenant", async () => {
    const { backend, watcher } = await watching();
    try {
      const { machine: other } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
        tenantId: c.tenant.tenant.id,
      });
      await clients(c.transport, c.root).machines.bindCertificate({
        machineUserId: other!.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      expect(await certificateUser(c.ts, backend)).toBe(other!.id);
      await expectEnded(watcher);
    } finally {
      watcher.close();
    }
  });

  it("opened with a token the certificate alone obtained, ends once the fingerprint is bound to another machine user", async () => {
    const { backend, watcher, token } = await watching(true);
    try {
      const { machine: other } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
        tenantId: c.tenant.tenant.id,
      });
      await clients(c.transport, c.root).machines.bindCertificate({
        machineUserId: other!.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      await expectEnded(watcher);
      // Its reconnection is refused by authentication, as any other call with the token.
      expect(await machineOutcome(presenting(c.ts, backend), token)).toBe("TOKEN_REVOKED");
    } finally {
      watcher.close();
    }
  });

  it("ends once another tenant binds the certificate's fingerprint (it then authenticates no one)", async () => {
    const { backend, watcher } = await watching();
    try {
      const other = await tenantWithAdmin(c.transport, c.root, ["admin:machine-users"]);
      const { machine: theirs } = await bearerMachine(c.transport, other.token, [other.application.id]);
      await clients(c.transport, other.token).machines.bindCertificate({
        machineUserId: theirs!.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      expect(await certificateUser(c.ts, backend)).toBe("AUTH_REQUIRED");
      await expectEnded(watcher);
    } finally {
      watcher.close();
    }
  });

  it("keeps running through binding changes that leave the certificate its caller's", async () => {
    const { watcher } = await watching();
    try {
      const { machine: other } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
        tenantId: c.tenant.tenant.id,
      });
      // Another certificate bound to another machine user, in the tenant and in another one.
      const unrelated = await mintBackend(c.ts, `spiffe://tenant.example/other/${short()}`);
      await clients(c.transport, c.root).machines.bindCertificate({
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
