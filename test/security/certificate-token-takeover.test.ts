import { Code, createClient } from "@connectrpc/connect";
import { decodeJwt, SignJWT } from "jose";
import { Agent, request } from "undici";
import { beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { CERTIFICATE_TOKEN_CLAIMS } from "../../src/auth/certificate-token.js";
import { rejection } from "../errors-util.js";
import { DATABASES, SQLITE, type TestServer } from "../helpers.js";
import {
  basic,
  basicMachine,
  bearerMachine,
  clients,
  short,
  tenantWithAdmin,
  verificationCodes,
  verifierMachine,
} from "../machine-fixtures.js";
import {
  type Backend,
  certificateTenant,
  certificateUser,
  machineOutcome,
  mintBackend,
  presenting,
} from "./fixtures.js";

/**
 * A machine access token issued to a client certificate alone (IssueAccessToken over mTLS,
 * or the token endpoint's tls_client_auth) had that certificate's binding for authority.
 * Before it was marked (`amr: ["mtls"]`, `cert_san_uris`), a binding change that took the
 * certificate from its machine user (a fingerprint bound to another machine user of the
 * tenant, a SAN URI contest won by another, an unbind or a scope change that flipped a
 * contest) left the token acting as that machine user until it expired, while the
 * certificate itself no longer authenticated as it. Now every use re-decides the
 * certificate's owner from the token: its next request, VerifyCredential and introspection
 * refuse it. A token obtained by a password or token sent over the certificate's connection
 * keeps today's behaviour: bound to the certificate (cnf), its authority the credential's.
 */

/** What each way of presenting `token` answers: an RPC over `backend`'s connection, VerifyCredential, introspection. */
async function uses(ts: TestServer, verifier: string, backend: Backend, token: string) {
  const agent = new Agent({ connect: { ca: ts.certs.ca } });
  try {
    const res = await request(`${ts.server.url}/oauth2/introspect`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded", authorization: `Bearer ${verifier}` },
      body: new URLSearchParams({ token }).toString(),
    });
    const introspection = (await res.body.json()) as { active: boolean };
    return {
      rpc: await machineOutcome(presenting(ts, backend), token),
      verified: (await verificationCodes([ts], verifier, token))[0],
      active: introspection.active,
    };
  } finally {
    await agent.close();
  }
}

const WORKS = { rpc: "ok", verified: "VALID", active: true };
const ENDED = { rpc: "TOKEN_REVOKED", verified: "REVOKED", active: false };

/**
 * Authenticate `token` as VerifyCredential does (its `cnf` standing in for the certificate):
 * its machine user, and whether that was decided without a promise.
 */
async function decided(ts: TestServer, token: string): Promise<{ now: boolean; id: string | undefined }> {
  const thumbprint = (decodeJwt(token).cnf as { "x5t#S256": string })["x5t#S256"];
  const certificate = { thumbprint, sha256Fingerprint: "", commonName: null, sanUris: [] };
  const state = { requestId: "certificate-token", ip: "127.0.0.1", certificate, principal: null };
  const answer = ts.app.authenticator.authenticate({ type: "bearer", token }, state);
  return { now: !(answer instanceof Promise), id: (await answer)?.id };
}

/** The token endpoint's client_credentials answer, the client authenticated by `backend`'s certificate alone. */
async function tlsClientAuth(
  ts: TestServer,
  backend: Backend,
): Promise<{ status: number; json: { access_token?: string; error?: string; error_description?: string } }> {
  const agent = new Agent({ connect: { ca: ts.certs.ca, cert: backend.cert, key: backend.key } });
  try {
    const res = await request(`${ts.server.url}/oauth2/token`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ grant_type: "client_credentials" }).toString(),
    });
    return { status: res.statusCode, json: (await res.body.json()) as never };
  } finally {
    await agent.close();
  }
}

/** A client_credentials token from the token endpoint, the client authenticated by `backend`'s certificate alone. */
async function tlsClientAuthToken(ts: TestServer, backend: Backend): Promise<string> {
  const { status, json } = await tlsClientAuth(ts, backend);
  expect(status, JSON.stringify(json)).toBe(200);
  return json.access_token!;
}

/** The certificate alone's IssueAccessToken answer: the token. */
async function certificateToken(ts: TestServer, backend: Backend): Promise<string> {
  return (await createClient(MachineUserService, presenting(ts, backend)).issueAccessToken({})).accessToken;
}

describe.each(DATABASES)("a machine access token issued to a certificate alone, on $name", (db) => {
  const c = certificateTenant(db);
  let verifier: string;
  beforeAll(async () => {
    verifier = await verifierMachine(c.transport, c.root, c.tenant.tenant.id);
  });

  const root = () => clients(c.transport, c.root).machines;
  const tenantId = () => c.tenant.tenant.id;

  /** A user of the tenant holding `scopes` (besides admin:machine-users), logged in: its MachineUserService client. */
  async function tenantAdmin(scopes: string[]) {
    const username = `ta-${short()}`;
    const password = "tenant admin password";
    await clients(c.transport, c.root).users.createUser({
      username,
      password,
      scopes: ["admin:machine-users", ...scopes],
      tenantId: tenantId(),
    });
    const login = await createClient(UserService, c.transport).login({
      username,
      password,
      tenant: tenantId(),
    });
    return clients(c.transport, login.accessToken).machines;
  }

  /** A bearer machine user of the tenant holding `scopes`, `san` bound to it by `binder` (default: the admin). */
  async function sanBound(san: string, scopes: string[] = [], binder = root()): Promise<string> {
    const { machine } = await bearerMachine(c.transport, c.root, [], { tenantId: tenantId(), scopes });
    await binder.bindCertificate({ machineUserId: machine!.id, identity: { case: "sanUri", value: san } });
    return machine!.id;
  }

  it("ends on the next request once the certificate's fingerprint is bound to another machine user of its tenant", async () => {
    const san = `spiffe://tenant.example/a/${short()}`;
    // A Basic machine user, so that a token its password obtains over the certificate's connection can be compared.
    const a = await basicMachine(c.transport, c.root, [], { tenantId: tenantId() });
    await root().bindCertificate({ machineUserId: a.machine!.id, identity: { case: "sanUri", value: san } });
    const backend = await mintBackend(c.ts, san);
    expect(await certificateUser(c.ts, backend)).toBe(a.machine!.id);

    const overRpc = await certificateToken(c.ts, backend);
    const overOAuth = await tlsClientAuthToken(c.ts, backend);
    const passwordToken = (
      await clients(presenting(c.ts, backend), basic(a.username, a.password)).machines.issueAccessToken({})
    ).accessToken;
    for (const token of [overRpc, overOAuth]) {
      const claims = decodeJwt(token);
      expect(claims.sub).toBe(a.machine!.id);
      expect(claims[CERTIFICATE_TOKEN_CLAIMS.amr]).toEqual(["mtls"]);
      expect(claims[CERTIFICATE_TOKEN_CLAIMS.sanUris]).toEqual([san]);
      expect(await uses(c.ts, verifier, backend, token)).toEqual(WORKS);
    }
    // Its re-decision is read through the state cache: once warm, decided without a promise.
    await decided(c.ts, overRpc);
    const warm = await decided(c.ts, overRpc);
    expect(warm).toEqual({ now: true, id: a.machine!.id });
    // Bound to the certificate, not marked: its authority is the password.
    const unmarked = decodeJwt(passwordToken);
    expect(unmarked.cnf).toBeDefined();
    expect(unmarked[CERTIFICATE_TOKEN_CLAIMS.amr]).toBeUndefined();
    expect(unmarked[CERTIFICATE_TOKEN_CLAIMS.sanUris]).toBeUndefined();

    // Not over-broad: another certificate's fingerprint bound to another machine user changes nothing.
    const unrelated = await mintBackend(c.ts, `spiffe://tenant.example/other/${short()}`);
    const { machine: other } = await bearerMachine(c.transport, c.root, [], { tenantId: tenantId() });
    await root().bindCertificate({
      machineUserId: other!.id,
      identity: { case: "sha256Fingerprint", value: unrelated.fingerprint },
    });
    expect(await uses(c.ts, verifier, backend, overRpc)).toEqual(WORKS);

    const { machine: b } = await bearerMachine(c.transport, c.root, [], { tenantId: tenantId() });
    await root().bindCertificate({
      machineUserId: b!.id,
      identity: { case: "sha256Fingerprint", value: backend.fingerprint },
    });
    expect(await certificateUser(c.ts, backend)).toBe(b!.id);
    expect(await uses(c.ts, verifier, backend, overRpc)).toEqual(ENDED);
    expect(await uses(c.ts, verifier, backend, overOAuth)).toEqual(ENDED);
    // Today's behaviour for the password's token: it still acts as A over the certificate's connection.
    expect(await uses(c.ts, verifier, backend, passwordToken)).toEqual(WORKS);
  });

  it("ends once another machine user wins a SAN URI contest for the certificate", async () => {
    const san = `spiffe://tenant.example/a/${short()}`;
    const rival = `spiffe://tenant.example/b/${short()}`;
    // Bound by the tenant's admin (admin:machine-users), who may not manage B (cluster:read).
    const a = await sanBound(san, [], clients(c.transport, c.tenant.token).machines);
    const backend = await mintBackend(c.ts, san, rival);
    expect(await certificateUser(c.ts, backend)).toBe(a);
    const token = await certificateToken(c.ts, backend);
    expect(await uses(c.ts, verifier, backend, token)).toEqual(WORKS);

    const b = await sanBound(rival, ["cluster:read"]);
    expect(await certificateUser(c.ts, backend)).toBe(b);
    expect(await uses(c.ts, verifier, backend, token)).toEqual(ENDED);
  });

  it("ends once an unbind of another machine user's binding turns the certificate into a contest", async () => {
    const [sanA, sanB, sanD] = ["a", "b", "d"].map((n) => `spiffe://tenant.example/${n}/${short()}`);
    // A's binder (the admin) may manage every rival; B's may manage A but not D; D's may manage neither.
    const a = await sanBound(sanA!, ["cluster:read"]);
    await sanBound(sanB!, [], await tenantAdmin(["cluster:read"]));
    const d = await sanBound(sanD!, ["cluster:write"], await tenantAdmin(["cluster:write"]));
    const backend = await mintBackend(c.ts, sanA!, sanB!, sanD!);
    expect(await certificateUser(c.ts, backend)).toBe(a);
    const token = await certificateToken(c.ts, backend);
    expect(await uses(c.ts, verifier, backend, token)).toEqual(WORKS);

    // D's binding gone, B's binder may manage its one rival: A's and B's both stand.
    await root().unbindCertificate({ machineUserId: d, identity: { case: "sanUri", value: sanD! } });
    expect(await certificateUser(c.ts, backend)).toBe("CREDENTIALS_INVALID");
    expect(await uses(c.ts, verifier, backend, token)).toEqual(ENDED);
  });

  it("ends once a scope change lets a rival binding contest the certificate", async () => {
    const san = `spiffe://tenant.example/a/${short()}`;
    const rival = `spiffe://tenant.example/b/${short()}`;
    const a = await sanBound(san, ["cluster:read"]);
    // Bound by the tenant's admin, who may not manage A while A holds cluster:read.
    await sanBound(rival, [], clients(c.transport, c.tenant.token).machines);
    const backend = await mintBackend(c.ts, san, rival);
    expect(await certificateUser(c.ts, backend)).toBe(a);
    const token = await certificateToken(c.ts, backend);
    expect(await uses(c.ts, verifier, backend, token)).toEqual(WORKS);

    await root().updateMachineUser({ id: a, scopes: { scopes: [] } });
    expect(await certificateUser(c.ts, backend)).toBe("CREDENTIALS_INVALID");
    expect(await uses(c.ts, verifier, backend, token)).toEqual(ENDED);
  });

  it("ends while another tenant binds the certificate's fingerprint, behind the tenant wall, and holds again once A proves it", async () => {
    const san = `spiffe://tenant.example/a/${short()}`;
    const a = await sanBound(san);
    const backend = await mintBackend(c.ts, san);
    const token = await certificateToken(c.ts, backend);
    expect(await uses(c.ts, verifier, backend, token)).toEqual(WORKS);

    // Tenant Y binds C's fingerprint: bound in two tenants, the certificate authenticates as no one.
    const y = await tenantWithAdmin(c.transport, c.root, ["admin:machine-users"]);
    const yVerifier = await verifierMachine(c.transport, c.root, y.tenant!.id);
    const { machine: yb } = await bearerMachine(c.transport, y.token, [], {});
    await clients(c.transport, y.token).machines.bindCertificate({
      machineUserId: yb!.id,
      identity: { case: "sha256Fingerprint", value: backend.fingerprint },
    });
    expect(await certificateUser(c.ts, backend)).toBe("AUTH_REQUIRED");
    expect(await uses(c.ts, verifier, backend, token)).toEqual(ENDED);
    // To Y's own verifier, A's token is another tenant's: not there at all.
    expect((await verificationCodes([c.ts], yVerifier, token))[0]).toBe("NOT_FOUND");

    // A's owner proves C's fingerprint (over C's connection): Y's binding gives way, C is A's again.
    await clients(presenting(c.ts, backend), c.root).machines.bindCertificate({
      machineUserId: a,
      identity: { case: "sha256Fingerprint", value: backend.fingerprint },
    });
    expect(await certificateUser(c.ts, backend)).toBe(a);
    // REVOKED is not final for such a token: it holds whenever its certificate is its machine user's.
    expect(await uses(c.ts, verifier, backend, token)).toEqual(WORKS);
  });

  it("is refused at issuance, not issued unmarked, when the certificate's SAN URIs make it too long to verify", async () => {
    const long = (n: string) => `spiffe://tenant.example/${n.repeat(1900)}/${short()}`;
    const san = long("x");
    const a = await sanBound(san);
    // One such SAN URI still makes a token that verifies: the refusal below is the length's.
    const one = await mintBackend(c.ts, san);
    expect(await uses(c.ts, verifier, one, await certificateToken(c.ts, one))).toEqual(WORKS);

    const two = await mintBackend(c.ts, san, long("y"));
    expect(await certificateUser(c.ts, two)).toBe(a);
    const refused = await rejection(certificateToken(c.ts, two));
    expect(refused.code).toBe(Code.InvalidArgument);
    expect(refused.message).toMatch(/SAN URIs make its access token too long to verify/);
    const { status, json } = await tlsClientAuth(c.ts, two);
    expect(status).toBe(400);
    expect(json.access_token).toBeUndefined();
    expect(json.error).toBe("invalid_request");
    expect(json.error_description).toMatch(/SAN URIs make its access token too long to verify/);
  });
});

describe("marker claims that are malformed (HS256, whose secret the test holds)", () => {
  const secret = "certificate token takeover test secret, 32+ chars";
  const c = certificateTenant(SQLITE, { auth: { jwt: { secret } } });

  /** A token Tessera's secret signs with the claims of a marked token for `subject`, less or more. */
  async function minted(subject: string, claims: Record<string, unknown>): Promise<string> {
    const { issuer, audience } = c.ts.app.config.auth.jwt;
    const now = Math.floor(Date.now() / 1000);
    return new SignJWT({ tid: c.tenant.tenant.id, scope: "", pk: "machine", ...claims })
      .setProtectedHeader({ alg: "HS256", typ: "at+jwt" })
      .setIssuer(issuer)
      .setAudience(audience)
      .setSubject(subject)
      .setIssuedAt(now)
      .setExpirationTime(now + 300)
      .setJti(crypto.randomUUID())
      .sign(new TextEncoder().encode(secret));
  }

  it("refuses amr mtls without cert_san_uris, without cnf, or with cert_san_uris not a string array", async () => {
    const san = `spiffe://tenant.example/a/${short()}`;
    const { machine } = await bearerMachine(c.transport, c.root, [], { tenantId: c.tenant.tenant.id });
    await clients(c.transport, c.root).machines.bindCertificate({
      machineUserId: machine!.id,
      identity: { case: "sanUri", value: san },
    });
    const backend = await mintBackend(c.ts, san);
    const issued = decodeJwt(await certificateToken(c.ts, backend));
    const cnf = issued.cnf;
    const over = presenting(c.ts, backend);
    // The well-formed one the test signs is accepted, so each refusal below is its claims'.
    expect(
      await machineOutcome(over, await minted(machine!.id, { cnf, amr: ["mtls"], cert_san_uris: [san] })),
    ).toBe("ok");
    for (const claims of [
      { cnf, amr: ["mtls"] },
      { cnf, amr: ["mtls"], cert_san_uris: san },
      { cnf, amr: ["mtls"], cert_san_uris: [1] },
      { cnf, amr: "mtls", cert_san_uris: [san] },
    ])
      expect(await machineOutcome(over, await minted(machine!.id, claims)), JSON.stringify(claims)).toBe(
        "TOKEN_INVALID",
      );
    // Without cnf it is no certificate's token: presented on any connection, refused as malformed.
    expect(
      await machineOutcome(c.transport, await minted(machine!.id, { amr: ["mtls"], cert_san_uris: [san] })),
    ).toBe("TOKEN_INVALID");
  });
});
