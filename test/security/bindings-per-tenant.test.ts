import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { rejection } from "../errors-util.js";
import { DATABASES, withHeaders } from "../helpers.js";
import { bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";
import {
  type Backend,
  certificateTenant,
  certificateUser,
  mintBackend as mint,
  presenting,
} from "./fixtures.js";

/**
 * Certificate bindings per tenant (each tenant binds an identity independently; which
 * tenant's bindings decide is machineOfCertificate's rule), driven over TLS as the tenants'
 * administrators and their workloads would:
 * - a CA that gave one SAN URI to two tenants' workloads: the tenant that proves it first
 *   does not take the other's certificates carrying it (before, the owner's later proof
 *   was AlreadyExists, and every certificate of the owner carrying the URI authenticated
 *   as the other tenant's machine user);
 * - a squatter's unproven binding of the owner's identity, made before or after the owner's
 *   proof, takes nothing from the owner (before, a squat after the proof was refused with
 *   AlreadyExists, an oracle, and one before it was deleted by the proof), and what the
 *   squatter's machine user obtained through it ends (its tokens; a held stream).
 */
describe.each(DATABASES)("certificate bindings per tenant on $name", (db) => {
  const c = certificateTenant(db, { verification: { watchHeartbeatSeconds: 1 } });

  async function otherTenant() {
    return tenantWithAdmin(c.transport, c.root, ["admin:machine-users", "auth:verify"]);
  }
  async function machineOf(tenant: { token: string; application: { id: string } }, scopes: string[] = []) {
    return (await bearerMachine(c.transport, tenant.token, [tenant.application.id], { scopes })).machine!;
  }
  /** BindCertificate by `token`, over `over` (a connection presenting a certificate: with proof). */
  function bind(
    token: string,
    machineUserId: string,
    identity: { case: "sanUri" | "sha256Fingerprint"; value: string },
    over: Transport = c.transport,
  ) {
    return clients(over, token).machines.bindCertificate({ machineUserId, identity });
  }
  async function whoAmI(transport: Transport, headers: Record<string, string> = {}): Promise<string> {
    try {
      return (await createClient(MachineUserService, withHeaders(transport, headers)).checkAuthentication({}))
        .machineUserId;
    } catch (err) {
      return (await rejection(Promise.reject(err))).reason ?? "";
    }
  }

  it("lookalike: a tenant that proves a shared SAN URI first does not take the owner's certificates carrying it", async () => {
    const san = `spiffe://shared.example/${short()}`;
    const a = await otherTenant();
    const b = await otherTenant();
    const theirs = await machineOf(a);
    const ours = await machineOf(b);
    // Tenant A's workload holds a certificate the CA also gave this SAN URI, and proves it first.
    const lookalike = await mint(c.ts, san);
    expect(
      (await bind(a.token, theirs.id, { case: "sanUri", value: san }, presenting(c.ts, lookalike))).binding!
        .proven,
    ).toBe(true);
    const owned: Backend = await mint(c.ts, san);
    expect(await certificateUser(c.ts, owned)).toBe(theirs.id);
    // The owner proves it too: bound (the answer says nothing of A), and its certificate then
    // authenticates as no one rather than as A's machine user.
    const proof = await bind(b.token, ours.id, { case: "sanUri", value: san }, presenting(c.ts, owned));
    expect(proof.binding!.proven).toBe(true);
    expect(await certificateUser(c.ts, owned)).toBe("AUTH_REQUIRED");
    expect(await certificateUser(c.ts, lookalike)).toBe("AUTH_REQUIRED");
    // Until the owner proves its certificate's fingerprint: then it is the owner's.
    await bind(
      b.token,
      ours.id,
      { case: "sha256Fingerprint", value: owned.fingerprint },
      presenting(c.ts, owned),
    );
    expect(await certificateUser(c.ts, owned)).toBe(ours.id);
  });

  it("a fingerprint proven in two tenants authenticates no one, and a proven fingerprint outranks another tenant's proven SAN URI", async () => {
    const san = `spiffe://shared.example/${short()}`;
    const cert = await mint(c.ts, san);
    const over = presenting(c.ts, cert);
    const a = await otherTenant();
    const b = await otherTenant();
    const theirs = await machineOf(a);
    const ours = await machineOf(b);
    await bind(a.token, theirs.id, { case: "sanUri", value: san }, over);
    await bind(b.token, ours.id, { case: "sha256Fingerprint", value: cert.fingerprint }, over);
    expect(await certificateUser(c.ts, cert)).toBe(ours.id);
    await bind(a.token, theirs.id, { case: "sha256Fingerprint", value: cert.fingerprint }, over);
    expect(await certificateUser(c.ts, cert)).toBe("AUTH_REQUIRED");
  });

  for (const kind of ["sanUri", "sha256Fingerprint"] as const) {
    it(`squat of a ${kind} before the owner's proof: the owner's certificate is the owner's, the squatter's tokens through it end`, async () => {
      const san = `spiffe://owner.example/${short()}`;
      const cert = await mint(c.ts, san);
      const identity =
        kind === "sanUri"
          ? { case: "sanUri" as const, value: san }
          : { case: "sha256Fingerprint" as const, value: cert.fingerprint };
      const squatter = await otherTenant();
      const owner = await otherTenant();
      const theirs = await machineOf(squatter);
      await bind(squatter.token, theirs.id, identity);
      const over = presenting(c.ts, cert);
      expect(await whoAmI(over)).toBe(theirs.id);
      const { accessToken } = await createClient(MachineUserService, over).issueAccessToken({});
      const bearer = { authorization: `Bearer ${accessToken}` };
      expect(await whoAmI(over, bearer)).toBe(theirs.id);

      const ours = await machineOf(owner);
      await bind(owner.token, ours.id, identity, over);
      expect(await whoAmI(over)).toBe(ours.id);
      expect(await whoAmI(over, bearer)).toBe("TOKEN_REVOKED");
      // The squat is kept, in its tenant, and listed there.
      const listed = (await clients(c.transport, squatter.token).machines.getMachineUser({ id: theirs.id }))
        .machineUser!.certificates;
      expect(listed).toHaveLength(1);
    });

    it(`squat of a ${kind} after the owner's proof takes nothing, whichever comes first`, async () => {
      const san = `spiffe://owner.example/${short()}`;
      const cert = await mint(c.ts, san);
      const identity =
        kind === "sanUri"
          ? { case: "sanUri" as const, value: san }
          : { case: "sha256Fingerprint" as const, value: cert.fingerprint };
      const owner = await otherTenant();
      const ours = await machineOf(owner);
      const over = presenting(c.ts, cert);
      await bind(owner.token, ours.id, identity, over);
      expect(await whoAmI(over)).toBe(ours.id);
      // Before, AlreadyExists: the squatter learnt the identity was bound. Now bound, and inert.
      const squatter = await otherTenant();
      const theirs = await machineOf(squatter);
      expect((await bind(squatter.token, theirs.id, identity)).binding!.proven).toBe(false);
      expect(await whoAmI(over)).toBe(ours.id);
    });
  }

  it("the owner proving its own unproven binding outranks a squat made before it, and ends the squatter's tokens", async () => {
    const san = `spiffe://owner.example/${short()}`;
    const cert = await mint(c.ts, san);
    const over = presenting(c.ts, cert);
    const identity = { case: "sanUri" as const, value: san };
    const squatter = await otherTenant();
    const theirs = await machineOf(squatter);
    await bind(squatter.token, theirs.id, identity);
    const { accessToken } = await createClient(MachineUserService, over).issueAccessToken({});
    const bearer = { authorization: `Bearer ${accessToken}` };
    const owner = await otherTenant();
    const ours = await machineOf(owner);
    await bind(owner.token, ours.id, identity);
    // Two unproven claims of two tenants: no one.
    expect(await whoAmI(over)).toBe("AUTH_REQUIRED");
    const proof = await bind(owner.token, ours.id, identity, over);
    expect(proof.binding!.proven).toBe(true);
    expect(await whoAmI(over)).toBe(ours.id);
    expect(await whoAmI(over, bearer)).toBe("TOKEN_REVOKED");
  });

  it("a held certificate-authenticated stream of the squatter's machine user ends when the owner proves the identity", async () => {
    const san = `spiffe://owner.example/watch/${short()}`;
    const squatter = await otherTenant();
    const theirs = await machineOf(squatter, ["auth:verify"]);
    await bind(squatter.token, theirs.id, { case: "sanUri", value: san });
    const cert = await mint(c.ts, san);
    expect(await certificateUser(c.ts, cert)).toBe(theirs.id);
    const watcher = new Watcher(createClient(VerificationService, presenting(c.ts, cert)));
    await watcher.first();
    try {
      const owner = await otherTenant();
      const ours = await machineOf(owner);
      await bind(owner.token, ours.id, { case: "sanUri", value: san }, presenting(c.ts, cert));
      expect(await certificateUser(c.ts, cert)).toBe(ours.id);
      const ended = await watcher.end(5_000);
      expect(ended, "the stream kept running after its certificate was outranked").toBeInstanceOf(
        ConnectError,
      );
      expect((ended as ConnectError).code).toBe(Code.Unavailable);
    } finally {
      watcher.close();
    }
  });
});
