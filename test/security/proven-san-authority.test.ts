import type { Transport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { DATABASES } from "../helpers.js";
import { bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { certificateTenant, certificateUser, mintBackend as mint, presenting } from "./fixtures.js";

/**
 * The adversarial review of 2026-12-06 (sec-a): a proven SAN URI binding proves that its
 * maker holds *a* certificate carrying that URI, not the certificate being authenticated.
 * It decided over every unproven SAN URI binding of the same certificate, whoever had bound
 * them. Across tenants: a tenant holding a certificate that shares one SAN URI with another
 * tenant's certificate proved that URI, and the other tenant's certificate then
 * authenticated as the prover's machine user (a wall breach); now the two tenants' bindings
 * disagree and it authenticates no one until its owner proves its fingerprint, as for a
 * fingerprint squat. Within a tenant: a holder of admin:machine-users did the same to a
 * stronger machine user's certificate (or, against a proven binding, locked it out); taking
 * a certificate from a machine user is managing it, so the binder's authority decides, as
 * it does for unproven bindings.
 */

describe.each(DATABASES)("a proven SAN URI binding against the binder's authority on $name", (db) => {
  const c = certificateTenant(db);

  /** Two SAN URIs; the stronger machine user's certificate carries both, the attacker's only the second. */
  function uris() {
    const id = short();
    return { own: `spiffe://tenant.example/api/${id}`, shared: `spiffe://tenant.example/pool/${id}` };
  }

  async function machine(token: string, scopes: string[] = []) {
    return (
      await bearerMachine(c.transport, token, [c.tenant.application.id], {
        tenantId: c.tenant.tenant.id,
        scopes,
      })
    ).machine;
  }

  async function bindSan(token: string, machineUserId: string, san: string, over: Transport = c.transport) {
    await clients(over, token).machines.bindCertificate({
      machineUserId,
      identity: { case: "sanUri", value: san },
    });
  }

  for (const strongProven of [false, true]) {
    it(`an admin:machine-users holder proving a shared SAN URI takes nothing from a stronger machine user bound ${strongProven ? "with" : "without"} proof`, async () => {
      const san = uris();
      const strong = await machine(c.root, ["cluster:write"]);
      const victim = await mint(c.ts, san.own, san.shared);
      await bindSan(c.root, strong.id, san.own, strongProven ? presenting(c.ts, victim) : c.transport);
      expect(await certificateUser(c.ts, victim)).toBe(strong.id);

      const weak = await machine(c.tenant.token);
      const attacker = await mint(c.ts, san.shared);
      // The bind itself is the attacker's right: the URI is on a certificate it holds.
      await bindSan(c.tenant.token, weak.id, san.shared, presenting(c.ts, attacker));
      expect(await certificateUser(c.ts, attacker)).toBe(weak.id);
      // The stronger machine user's certificate is still its own.
      expect(await certificateUser(c.ts, victim)).toBe(strong.id);
    });
  }

  describe("another tenant", () => {
    it("proving a SAN URI a certificate shares with its owner's takes nothing: the certificate then authenticates no one", async () => {
      const san = uris();
      const owner = await machine(c.tenant.token);
      const victim = await mint(c.ts, san.own, san.shared);
      await bindSan(c.tenant.token, owner.id, san.own);
      expect(await certificateUser(c.ts, victim)).toBe(owner.id);

      const other = await tenantWithAdmin(c.transport, c.root, ["admin:machine-users"]);
      const { machine: theirs } = await bearerMachine(c.transport, other.token, [other.application.id]);
      const attacker = await mint(c.ts, san.shared);
      await bindSan(other.token, theirs.id, san.shared, presenting(c.ts, attacker));
      expect(await certificateUser(c.ts, attacker)).toBe(theirs.id);
      // Not the other tenant's: the two tenants' bindings disagree, as a fingerprint squat does.
      expect(await certificateUser(c.ts, victim)).toBe("AUTH_REQUIRED");
      // Its owner settles it by proving the certificate's own fingerprint.
      await clients(presenting(c.ts, victim), c.tenant.token).machines.bindCertificate({
        machineUserId: owner.id,
        identity: { case: "sha256Fingerprint", value: victim.fingerprint },
      });
      expect(await certificateUser(c.ts, victim)).toBe(owner.id);
    });

    it("squatting a SAN URI of a certificate whose holder proved another denies it only until the holder proves that one too", async () => {
      const san = uris();
      const holder = await machine(c.tenant.token);
      const backend = await mint(c.ts, san.own, san.shared);
      await bindSan(c.tenant.token, holder.id, san.own, presenting(c.ts, backend));
      expect(await certificateUser(c.ts, backend)).toBe(holder.id);

      const other = await tenantWithAdmin(c.transport, c.root, ["admin:machine-users"]);
      const { machine: squatter } = await bearerMachine(c.transport, other.token, [other.application.id]);
      await bindSan(other.token, squatter.id, san.shared);
      expect(await certificateUser(c.ts, backend)).toBe("AUTH_REQUIRED");
      // Proving the squatted URI displaces the squat.
      await bindSan(c.tenant.token, holder.id, san.shared, presenting(c.ts, backend));
      expect(await certificateUser(c.ts, backend)).toBe(holder.id);
    });
  });

  it("a proof still decides over an unproven binding its binder may manage", async () => {
    const san = uris();
    const first = await machine(c.tenant.token);
    const victim = await mint(c.ts, san.own, san.shared);
    await bindSan(c.tenant.token, first.id, san.own);
    expect(await certificateUser(c.ts, victim)).toBe(first.id);
    const second = await machine(c.tenant.token);
    await bindSan(c.tenant.token, second.id, san.shared, presenting(c.ts, await mint(c.ts, san.shared)));
    expect(await certificateUser(c.ts, victim)).toBe(second.id);
  });
});
