import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { type Backend, mintBackend as mint } from "./fixtures.js";

/**
 * The adversarial review of 2026-12-06 (cert-review) of the certificate-binding rules:
 * - a proven bind that displaced another tenant's unproven binding of the same identity
 *   removed it without ending the access tokens certificates had obtained through it
 *   (bound to the certificate, not to the binding), as UnbindCertificate ends them: the
 *   certificate kept authenticating as the displaced binding's machine user with them;
 * - proving one's own unproven fingerprint binding made it proven (which outranks every
 *   SAN URI binding of the certificate) without the authority check a new proven
 *   fingerprint binding must pass: a holder of admin:machine-users that bound the
 *   fingerprint before a stronger machine user's SAN URI binding was made took that
 *   machine user's certificate by re-binding it with proof;
 * - within a tenant, an unproven SAN URI binding of a machine user the provers' binders may
 *   not manage took the certificate from a proven one even when its own binder could not
 *   manage the provers' machine user either: a holder of admin:machine-users with a scope
 *   the prover's binder lacks bound a second SAN URI of a proven certificate, without
 *   proof, to a machine user holding that scope, and the certificate authenticated as it.
 *   Where neither binder may manage the other's machine user, the certificate is refused,
 *   as between two unproven bindings. The same held against an unproven fingerprint binding.
 */

function presenting(ts: TestServer, backend: Backend): Transport {
  return createConnectTransport({
    baseUrl: ts.server.url,
    httpVersion: "2",
    nodeOptions: { ca: ts.certs.ca, cert: backend.cert, key: backend.key },
  });
}

/** Whom a call over `transport` (with `headers`) authenticates as, or the refusal's reason. */
async function whoAmI(transport: Transport, headers: Record<string, string> = {}): Promise<string> {
  try {
    return (await createClient(MachineUserService, withHeaders(transport, headers)).checkAuthentication({}))
      .machineUserId;
  } catch (err) {
    return (await rejection(Promise.reject(err))).reason ?? "";
  }
}

describe.each(DATABASES)("certificate bindings, review of 2026-12-06, on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    transport = ts.connect();
    root = await adminLogin(transport);
  });
  afterAll(async () => {
    await ts.close();
  });

  /** Another admin of `tenantId` holding `scopes`: its access token. */
  async function secondAdmin(tenantId: string, scopes: string[]): Promise<string> {
    const username = `admin-${short()}`;
    const password = "second admin password";
    await clients(transport, root).users.createUser({ username, password, scopes, tenantId });
    return (await createClient(UserService, transport).login({ username, password, tenant: tenantId }))
      .accessToken;
  }

  it("a displaced binding's certificate-bound access tokens end with it", async () => {
    const san = `spiffe://shared.example/${short()}`;
    const owner = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
    const squatter = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
    const { machine: theirs } = await bearerMachine(transport, squatter.token, [squatter.application.id]);
    await clients(transport, squatter.token).machines.bindCertificate({
      machineUserId: theirs!.id,
      identity: { case: "sanUri", value: san },
    });
    const cert = await mint(ts, san);
    const over = presenting(ts, cert);
    expect(await whoAmI(over)).toBe(theirs!.id);
    const { accessToken } = await createClient(MachineUserService, over).issueAccessToken({});
    const bearer = { authorization: `Bearer ${accessToken}` };
    expect(await whoAmI(over, bearer)).toBe(theirs!.id);

    const { machine: ours } = await bearerMachine(transport, owner.token, [owner.application.id]);
    await clients(over, owner.token).machines.bindCertificate({
      machineUserId: ours!.id,
      identity: { case: "sanUri", value: san },
    });
    expect(await whoAmI(over)).toBe(ours!.id);
    // The token the displaced binding gave the certificate ends, as an unbinding's would.
    expect(await whoAmI(over, bearer)).toBe("TOKEN_REVOKED");
    const [row] = (
      await clients(transport, root).machines.listMachineUsers({ tenantId: squatter.tenant.id })
    ).machineUsers.filter((m) => m.id === theirs!.id);
    expect(row, "the displaced binding's machine user stays").toBeDefined();
  });

  it("proving one's own unproven fingerprint binding needs the authority a new proven one needs", async () => {
    const tenant = await tenantWithAdmin(transport, root, ["admin:machine-users"]);
    const san = `spiffe://tenant.example/api/${short()}`;
    const cert = await mint(ts, san);
    const { machine: weak } = await bearerMachine(transport, tenant.token, [tenant.application.id]);
    // Bound before any SAN URI binding of the certificate exists: nothing to outrank yet.
    await clients(transport, tenant.token).machines.bindCertificate({
      machineUserId: weak!.id,
      identity: { case: "sha256Fingerprint", value: cert.fingerprint },
    });
    const { machine: strong } = await bearerMachine(transport, root, [tenant.application.id], {
      tenantId: tenant.tenant.id,
      scopes: ["cluster:write"],
    });
    await clients(transport, root).machines.bindCertificate({
      machineUserId: strong!.id,
      identity: { case: "sanUri", value: san },
    });
    const over = presenting(ts, cert);
    expect(await whoAmI(over)).toBe(strong!.id);

    const proving = clients(over, tenant.token).machines.bindCertificate({
      machineUserId: weak!.id,
      identity: { case: "sha256Fingerprint", value: cert.fingerprint },
    });
    expect(
      ConnectError.from(
        await proving.then(
          () => null,
          (err: unknown) => err,
        ),
      ).code,
    ).toBe(Code.PermissionDenied);
    expect(await whoAmI(over)).toBe(strong!.id);
  });

  it("an unproven SAN URI binding whose binder may not manage the prover's machine user takes nothing from it", async () => {
    const tenant = await tenantWithAdmin(transport, root, ["admin:machine-users", "cluster:write"]);
    // A second admin of the tenant, holding a scope the first lacks (and lacking one it holds).
    const weak = await secondAdmin(tenant.tenant.id, ["admin:machine-users", "billing:read"]);
    const id = short();
    const own = `spiffe://tenant.example/api/${id}`;
    const second = `spiffe://tenant.example/pool/${id}`;
    const cert = await mint(ts, own, second);
    const over = presenting(ts, cert);
    const { machine: strong } = await bearerMachine(transport, tenant.token, [tenant.application.id], {
      scopes: ["cluster:write"],
    });
    await clients(over, tenant.token).machines.bindCertificate({
      machineUserId: strong!.id,
      identity: { case: "sanUri", value: own },
    });
    expect(await whoAmI(over)).toBe(strong!.id);

    const { machine: theirs } = await bearerMachine(transport, weak, [tenant.application.id], {
      scopes: ["billing:read"],
    });
    await clients(transport, weak).machines.bindCertificate({
      machineUserId: theirs!.id,
      identity: { case: "sanUri", value: second },
    });
    // Neither binder may manage the other's machine user: refused, as two unproven bindings are.
    expect(await whoAmI(over)).toBe("CREDENTIALS_INVALID");
  });

  it("an unproven SAN URI binding whose binder may not manage the fingerprint's machine user takes nothing from it", async () => {
    const tenant = await tenantWithAdmin(transport, root, ["admin:machine-users", "cluster:write"]);
    const weak = await secondAdmin(tenant.tenant.id, ["admin:machine-users", "billing:read"]);
    const san = `spiffe://tenant.example/api/${short()}`;
    const cert = await mint(ts, san);
    const over = presenting(ts, cert);
    const { machine: strong } = await bearerMachine(transport, tenant.token, [tenant.application.id], {
      scopes: ["cluster:write"],
    });
    await clients(transport, tenant.token).machines.bindCertificate({
      machineUserId: strong!.id,
      identity: { case: "sha256Fingerprint", value: cert.fingerprint },
    });
    expect(await whoAmI(over)).toBe(strong!.id);

    const { machine: theirs } = await bearerMachine(transport, weak, [tenant.application.id], {
      scopes: ["billing:read"],
    });
    await clients(transport, weak).machines.bindCertificate({
      machineUserId: theirs!.id,
      identity: { case: "sanUri", value: san },
    });
    expect(await whoAmI(over)).toBe("CREDENTIALS_INVALID");
  });
});
