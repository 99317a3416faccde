import type { Transport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Code, rejection } from "../errors-util.js";
import { DATABASES } from "../helpers.js";
import { bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { certificateTenant, certificateUser, mintBackend as mint, presenting } from "./fixtures.js";

/**
 * The adversarial review of authority and tenant walls, RPC by RPC (w-rauthz). Each test is
 * an attack that worked before its fix, driven over TLS against the real server.
 */
describe.each(DATABASES)("review: authority and tenant walls on $name", (db) => {
  const c = certificateTenant(db);

  async function bindSan(token: string, machineUserId: string, san: string, over: Transport = c.transport) {
    return clients(over, token).machines.bindCertificate({
      machineUserId,
      identity: { case: "sanUri", value: san },
    });
  }

  describe("BindCertificate displacement", () => {
    it("another tenant proving a SAN URI with a lookalike certificate neither displaces the owner's unproven binding nor takes its certificate", async () => {
      // A CA that gave one SAN URI to two tenants' certificates (the case machineOfCertificate
      // refuses to decide between): the owner bound the URI from its console, without proof.
      const san = `spiffe://tenant.example/api/${short()}`;
      const { machine: owner } = await bearerMachine(c.transport, c.tenant.token, [c.tenant.application.id]);
      const victim = await mint(c.ts, san);
      await bindSan(c.tenant.token, owner.id, san);
      expect(await certificateUser(c.ts, victim)).toBe(owner.id);

      const other = await tenantWithAdmin(c.transport, c.root, ["admin:machine-users"]);
      const { machine: theirs } = await bearerMachine(c.transport, other.token, [other.application.id]);
      const lookalike = await mint(c.ts, san);
      const attempt = bindSan(other.token, theirs.id, san, presenting(c.ts, lookalike));
      await attempt.catch(() => undefined);
      // The owner's certificate is still its own, never the other tenant's machine user.
      expect(await certificateUser(c.ts, victim)).toBe(owner.id);
      // The answer every bind of an identity bound elsewhere gets.
      expect((await rejection(attempt)).code).toBe(Code.AlreadyExists);
      const { machineUser } = await clients(c.transport, c.tenant.token).machines.getMachineUser({
        id: owner.id,
      });
      expect(machineUser!.certificates.map((b) => b.sanUri)).toEqual([san]);
    });
  });
});
