import { createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { type Backend, mintBackend as mint } from "./fixtures.js";

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

function presenting(ts: TestServer, backend: Backend): Transport {
  return createConnectTransport({
    baseUrl: ts.server.url,
    httpVersion: "2",
    nodeOptions: { ca: ts.certs.ca, cert: backend.cert, key: backend.key },
  });
}

/** The machine user the certificate alone authenticates as, or the refusal's reason. */
async function whoAmI(ts: TestServer, backend: Backend): Promise<string> {
  try {
    return (await createClient(MachineUserService, presenting(ts, backend)).checkAuthentication({}))
      .machineUserId;
  } catch (err) {
    return (await rejection(Promise.reject(err))).reason ?? "";
  }
}

describe.each(DATABASES)("a proven SAN URI binding against the binder's authority on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let root: string;
  let tenant: Awaited<ReturnType<typeof tenantWithAdmin>>;

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    transport = ts.connect();
    root = await adminLogin(transport);
    tenant = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
  });
  afterAll(async () => {
    await ts.close();
  });

  /** Two SAN URIs; the stronger machine user's certificate carries both, the attacker's only the second. */
  function uris() {
    const id = short();
    return { own: `spiffe://tenant.example/api/${id}`, shared: `spiffe://tenant.example/pool/${id}` };
  }

  async function machine(token: string, scopes: string[] = []) {
    return (
      await bearerMachine(transport, token, [tenant.application.id], {
        tenantId: tenant.tenant.id,
        scopes,
      })
    ).machine;
  }

  async function bindSan(token: string, machineUserId: string, san: string, over: Transport = transport) {
    await clients(over, token).machines.bindCertificate({
      machineUserId,
      identity: { case: "sanUri", value: san },
    });
  }

  for (const strongProven of [false, true]) {
    it(`an admin:machine-users holder proving a shared SAN URI takes nothing from a stronger machine user bound ${strongProven ? "with" : "without"} proof`, async () => {
      const san = uris();
      const strong = await machine(root, ["cluster:write"]);
      const victim = await mint(ts, san.own, san.shared);
      await bindSan(root, strong.id, san.own, strongProven ? presenting(ts, victim) : transport);
      expect(await whoAmI(ts, victim)).toBe(strong.id);

      const weak = await machine(tenant.token);
      const attacker = await mint(ts, san.shared);
      // The bind itself is the attacker's right: the URI is on a certificate it holds.
      await bindSan(tenant.token, weak.id, san.shared, presenting(ts, attacker));
      expect(await whoAmI(ts, attacker)).toBe(weak.id);
      // The stronger machine user's certificate is still its own.
      expect(await whoAmI(ts, victim)).toBe(strong.id);
    });
  }

  describe("another tenant", () => {
    it("proving a SAN URI a certificate shares with its owner's takes nothing: the certificate then authenticates no one", async () => {
      const san = uris();
      const owner = await machine(tenant.token);
      const victim = await mint(ts, san.own, san.shared);
      await bindSan(tenant.token, owner.id, san.own);
      expect(await whoAmI(ts, victim)).toBe(owner.id);

      const other = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
      const { machine: theirs } = await bearerMachine(transport, other.token, [other.application.id]);
      const attacker = await mint(ts, san.shared);
      await bindSan(other.token, theirs.id, san.shared, presenting(ts, attacker));
      expect(await whoAmI(ts, attacker)).toBe(theirs.id);
      // Not the other tenant's: the two tenants' bindings disagree, as a fingerprint squat does.
      expect(await whoAmI(ts, victim)).toBe("AUTH_REQUIRED");
      // Its owner settles it by proving the certificate's own fingerprint.
      await clients(presenting(ts, victim), tenant.token).machines.bindCertificate({
        machineUserId: owner.id,
        identity: { case: "sha256Fingerprint", value: victim.fingerprint },
      });
      expect(await whoAmI(ts, victim)).toBe(owner.id);
    });

    it("squatting a SAN URI of a certificate whose holder proved another denies it only until the holder proves that one too", async () => {
      const san = uris();
      const holder = await machine(tenant.token);
      const backend = await mint(ts, san.own, san.shared);
      await bindSan(tenant.token, holder.id, san.own, presenting(ts, backend));
      expect(await whoAmI(ts, backend)).toBe(holder.id);

      const other = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
      const { machine: squatter } = await bearerMachine(transport, other.token, [other.application.id]);
      await bindSan(other.token, squatter.id, san.shared);
      expect(await whoAmI(ts, backend)).toBe("AUTH_REQUIRED");
      // Proving the squatted URI displaces the squat.
      await bindSan(tenant.token, holder.id, san.shared, presenting(ts, backend));
      expect(await whoAmI(ts, backend)).toBe(holder.id);
    });
  });

  it("a proof still decides over an unproven binding its binder may manage", async () => {
    const san = uris();
    const first = await machine(tenant.token);
    const victim = await mint(ts, san.own, san.shared);
    await bindSan(tenant.token, first.id, san.own);
    expect(await whoAmI(ts, victim)).toBe(first.id);
    const second = await machine(tenant.token);
    await bindSan(tenant.token, second.id, san.shared, presenting(ts, await mint(ts, san.shared)));
    expect(await whoAmI(ts, victim)).toBe(second.id);
  });
});
