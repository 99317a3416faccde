import { createClient } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { Code, rejection } from "../errors-util.js";
import { DATABASES, type TestServer } from "../helpers.js";
import { bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { type Backend, certificateTenant, mintBackend as mint, presenting } from "./fixtures.js";

/**
 * The adversarial review of bounded authority of 2026-12-06 (certificate identities within
 * one tenant), over TLS: within a tenant a fingerprint binding outranks the SAN URI binding
 * of the same certificate, and a certificate's fingerprint is public (sent in every
 * handshake). A holder of admin:machine-users binding the fingerprint of a stronger machine
 * user's certificate to a weak machine user of its own took that certificate over: the
 * stronger machine user's backend then authenticated as the attacker's machine user. The
 * bind checked authority over the machine user bound to, never over the one the
 * certificate is taken from.
 */

/** The machine user the backend's certificate alone authenticates as. */
async function whoAmI(ts: TestServer, backend: Backend): Promise<string> {
  return (await createClient(MachineUserService, presenting(ts, backend)).checkAuthentication({}))
    .machineUserId;
}

/** The backend's certificate alone authenticates no one: it is bound to more than one machine user. */
async function expectRefused(ts: TestServer, backend: Backend): Promise<void> {
  const r = await rejection(
    createClient(MachineUserService, presenting(ts, backend)).checkAuthentication({}),
  );
  expect({ code: r.code, reason: r.reason, message: r.message }).toEqual({
    code: Code.Unauthenticated,
    reason: "CREDENTIALS_INVALID",
    message: "client certificate is bound to more than one machine user",
  });
}

describe.each(DATABASES)("authority over certificate identities within a tenant on $name", (db) => {
  const c = certificateTenant(db);

  /** A machine user of the tenant holding cluster:write (which the tenant's administrator lacks), its certificate bound by SAN URI. */
  async function strongBackend(): Promise<{ id: string; backend: Backend }> {
    const san = `spiffe://tenant.example/${short()}`;
    const { machine } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
      tenantId: c.tenant.tenant.id,
      scopes: ["cluster:write"],
    });
    await clients(c.transport, c.root).machines.bindCertificate({
      machineUserId: machine.id,
      identity: { case: "sanUri", value: san },
    });
    const backend = await mint(c.ts, san);
    expect(await whoAmI(c.ts, backend)).toBe(machine.id);
    return { id: machine.id, backend };
  }

  it("an admin:machine-users holder cannot take a stronger machine user's certificate by binding its fingerprint to a machine user of its own", async () => {
    const victim = await strongBackend();
    const { machine: own } = await bearerMachine(c.transport, c.tenant.token, [c.tenant.application.id]);
    const r = await rejection(
      clients(c.transport, c.tenant.token).machines.bindCertificate({
        machineUserId: own.id,
        identity: { case: "sha256Fingerprint", value: victim.backend.fingerprint },
      }),
    );
    expect({ code: r.code, reason: r.reason }).toEqual({
      code: Code.PermissionDenied,
      reason: "ACCESS_DENIED",
    });
    // Untouched: the certificate still authenticates as the stronger machine user.
    expect(await whoAmI(c.ts, victim.backend)).toBe(victim.id);
  });

  it("a caller holding the stronger machine user's scopes still singles one of its certificates out by fingerprint", async () => {
    const fleet = await strongBackend();
    const { machine: special } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
      tenantId: c.tenant.tenant.id,
    });
    await clients(c.transport, c.root).machines.bindCertificate({
      machineUserId: special.id,
      identity: { case: "sha256Fingerprint", value: fleet.backend.fingerprint },
    });
    expect(await whoAmI(c.ts, fleet.backend)).toBe(special.id);
  });

  it("an admin:machine-users holder binds with proof a certificate carrying no SAN URI a stronger machine user holds", async () => {
    await strongBackend();
    const { machine: own } = await bearerMachine(c.transport, c.tenant.token, [c.tenant.application.id]);
    const mine = await mint(c.ts);
    // Over a connection presenting the certificate: its SAN URIs are known, and none is another's.
    await clients(presenting(c.ts, mine), c.tenant.token).machines.bindCertificate({
      machineUserId: own.id,
      identity: { case: "sha256Fingerprint", value: mine.fingerprint },
    });
    expect(await whoAmI(c.ts, mine)).toBe(own.id);
  });

  /**
   * The ordering gap: the bind-time refusal above sees only SAN URI bindings that exist when
   * the fingerprint is bound. A certificate is issued (its fingerprint known), a holder of
   * admin:machine-users binds that fingerprint first, and a strong administrator binds its
   * SAN URI to a stronger machine user afterwards. Each test takes a fresh tenant: the
   * fingerprint is bound while no machine user of the tenant is bound by a SAN URI.
   */
  describe("whichever binding was made first", () => {
    /** A fresh tenant whose administrator holds `scopes`, and a certificate carrying a SAN URI no one has bound yet. */
    async function issued(scopes: string[]) {
      const fresh = await tenantWithAdmin(c.transport, c.root, scopes);
      const san = `spiffe://tenant.example/${short()}`;
      return { fresh, san, backend: await mint(c.ts, san) };
    }

    /** Root binds the SAN URI to a new machine user of the tenant holding `scopes`. */
    async function sanBoundLater(tenantId: string, applicationId: string, san: string, scopes: string[]) {
      const { machine } = await bearerMachine(c.transport, c.root, [applicationId], { tenantId, scopes });
      await clients(c.transport, c.root).machines.bindCertificate({
        machineUserId: machine.id,
        identity: { case: "sanUri", value: san },
      });
      return machine.id;
    }

    it("a fingerprint an admin:machine-users holder bound before a stronger machine user's SAN URI binding existed does not take that certificate", async () => {
      const { fresh, san, backend } = await issued(["admin:machine-users"]);
      const { machine: own } = await bearerMachine(c.transport, fresh.token, [fresh.application.id]);
      await clients(c.transport, fresh.token).machines.bindCertificate({
        machineUserId: own.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      expect(await whoAmI(c.ts, backend)).toBe(own.id);
      const strong = await sanBoundLater(fresh.tenant.id, fresh.application.id, san, ["cluster:write"]);
      // The stronger machine user keeps its certificate (authenticated, not refused).
      expect(await whoAmI(c.ts, backend)).toBe(strong);
    });

    it("a fingerprint bound first by a caller holding the stronger machine user's scopes still singles its certificate out", async () => {
      const { fresh, san, backend } = await issued(["admin:machine-users", "cluster:write"]);
      const { machine: special } = await bearerMachine(c.transport, fresh.token, [fresh.application.id]);
      await clients(c.transport, fresh.token).machines.bindCertificate({
        machineUserId: special.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      await sanBoundLater(fresh.tenant.id, fresh.application.id, san, ["cluster:write"]);
      expect(await whoAmI(c.ts, backend)).toBe(special.id);
    });

    it("scopes granted to the SAN URI-bound machine user after the fingerprint was bound count at the next authentication", async () => {
      const { fresh, san, backend } = await issued(["admin:machine-users"]);
      const { machine: own } = await bearerMachine(c.transport, fresh.token, [fresh.application.id]);
      await clients(c.transport, fresh.token).machines.bindCertificate({
        machineUserId: own.id,
        identity: { case: "sha256Fingerprint", value: backend.fingerprint },
      });
      // A scopeless machine user: the binder's authority covers it, so the fingerprint outranks it.
      const later = await sanBoundLater(fresh.tenant.id, fresh.application.id, san, []);
      expect(await whoAmI(c.ts, backend)).toBe(own.id);
      await clients(c.transport, c.root).machines.updateMachineUser({
        id: later,
        scopes: { scopes: ["cluster:write"] },
      });
      expect(await whoAmI(c.ts, backend)).toBe(later);
    });
  });

  /**
   * The second half of the review: a certificate carrying several SAN URIs whose bindings
   * name different machine users was refused outright. A holder of admin:machine-users bound
   * a second SAN URI of a stronger machine user's certificate (its SAN URIs are no secret) to
   * a scopeless machine user of its own, and the stronger machine user's backend was locked
   * out. Now a SAN URI binding contests another machine user's only when its binder's scopes
   * cover that machine user's current ones.
   */
  describe("a certificate carrying several SAN URIs", () => {
    /** `binderToken` binds `san` to the tenant's machine user `machineId`. */
    async function bindSan(binderToken: string, machineId: string, san: string): Promise<void> {
      await clients(c.transport, binderToken).machines.bindCertificate({
        machineUserId: machineId,
        identity: { case: "sanUri", value: san },
      });
    }

    /** A machine user of the tenant holding `scopes`, made by root. */
    async function machineHolding(scopes: string[]): Promise<string> {
      const { machine } = await bearerMachine(c.transport, c.root, [c.tenant.application.id], {
        tenantId: c.tenant.tenant.id,
        scopes,
      });
      return machine.id;
    }

    const sans = () => [`spiffe://tenant.example/${short()}`, `spiffe://tenant.example/${short()}`];

    it("an admin:machine-users holder binding a second SAN URI of a stronger machine user's certificate to a machine user of its own does not lock that certificate out", async () => {
      const [first, second] = sans();
      const strong = await machineHolding(["cluster:write"]);
      await bindSan(c.root, strong, first!);
      const { machine: own } = await bearerMachine(c.transport, c.tenant.token, [c.tenant.application.id]);
      await bindSan(c.tenant.token, own.id, second!);
      expect(await whoAmI(c.ts, await mint(c.ts, first!, second!))).toBe(strong);
      // The weak binding stands where it contests no one: a certificate carrying only that SAN URI.
      expect(await whoAmI(c.ts, await mint(c.ts, second!))).toBe(own.id);
    });

    it("two SAN URI bindings whose binders may each manage the other's machine user still refuse the certificate", async () => {
      const [first, second] = sans();
      const one = await machineHolding(["cluster:write"]);
      const other = await machineHolding(["cluster:write"]);
      await bindSan(c.root, one, first!);
      await bindSan(c.root, other, second!);
      await expectRefused(c.ts, await mint(c.ts, first!, second!));
    });

    it("two SAN URI bindings whose binders may manage neither's machine user refuse the certificate", async () => {
      const [first, second] = sans();
      // A second administrator of the tenant, holding what the first lacks and lacking what it holds.
      const writer = await tenantAdmin(["admin:machine-users", "cluster:write"]);
      const reader = await tenantAdmin(["admin:machine-users", "cluster:read"]);
      const { machine: writing } = await bearerMachine(c.transport, writer, [c.tenant.application.id], {
        scopes: ["cluster:write"],
      });
      const { machine: reading } = await bearerMachine(c.transport, reader, [c.tenant.application.id], {
        scopes: ["cluster:read"],
      });
      await bindSan(writer, writing.id, first!);
      await bindSan(reader, reading.id, second!);
      await expectRefused(c.ts, await mint(c.ts, first!, second!));
    });

    it("scopes granted to or taken from a SAN URI-bound machine user count at the next authentication", async () => {
      const [first, second] = sans();
      const later = await machineHolding([]);
      await bindSan(c.root, later, first!);
      const { machine: own } = await bearerMachine(c.transport, c.tenant.token, [c.tenant.application.id]);
      await bindSan(c.tenant.token, own.id, second!);
      const backend = await mint(c.ts, first!, second!);
      // Both scopeless: each binder may manage the other's machine user.
      await expectRefused(c.ts, backend);
      const admin = clients(c.transport, c.root).machines;
      await admin.updateMachineUser({ id: later, scopes: { scopes: ["cluster:write"] } });
      expect(await whoAmI(c.ts, backend)).toBe(later);
      // Answered from the state cache now, which the next change must empty.
      const { hits } = c.ts.app.sql.cacheStats();
      expect(await whoAmI(c.ts, backend)).toBe(later);
      expect(c.ts.app.sql.cacheStats().hits).toBeGreaterThan(hits);
      await admin.updateMachineUser({ id: later, scopes: { scopes: [] } });
      await expectRefused(c.ts, backend);
    });

    /** Another administrator of the tenant holding `scopes`, logged in. */
    async function tenantAdmin(scopes: string[]): Promise<string> {
      const username = `ta-${short()}`;
      await clients(c.transport, c.root).users.createUser({
        username,
        password: "tenant admin password",
        scopes,
        tenantId: c.tenant.tenant.id,
      });
      return (
        await createClient(UserService, c.transport).login({
          username,
          password: "tenant admin password",
          tenant: c.tenant.tenant.id,
        })
      ).accessToken;
    }
  });
});
