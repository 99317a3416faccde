import { randomUUID, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { Agent } from "undici";
import { expect } from "vitest";
import { MachineAuthType, MachineUserService } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TenantService } from "../gen/tessera/v1/tenant_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { VerificationCode, VerificationService } from "../gen/tessera/v1/verification_service_pb.js";
import { createClientCertificate } from "../src/certs/dev-ca.js";
import { rejection } from "./errors-util.js";
import { ADMIN_PASSWORD, clientFor, type TestServer, withHeaders } from "./helpers.js";

/** Shared set-up for the tenant, machine-user and mTLS tests. */

export const short = () => randomUUID().slice(0, 8);

/** `Authorization: Basic` for a username and password. */
export function basic(username: string, password: string): Record<string, string> {
  return { authorization: `Basic ${Buffer.from(`${username}:${password}`).toString("base64")}` };
}

/** Clients of the three services over a transport, with a bearer token or extra headers. */
export function clients(transport: Transport, auth?: string | Record<string, string>) {
  const t = typeof auth === "object" ? withHeaders(transport, auth) : transport;
  const token = typeof auth === "string" ? auth : undefined;
  return {
    users: clientFor(UserService, t, token),
    tenants: clientFor(TenantService, t, token),
    machines: clientFor(MachineUserService, t, token),
  };
}

/** HTTP agents trusting `ts`'s CA, for its plain endpoints (OAuth): without, and with, its client certificate. */
export function tlsAgents(ts: TestServer): { agent: Agent; certAgent: Agent } {
  return {
    agent: new Agent({ connect: { ca: ts.certs.ca } }),
    certAgent: new Agent({
      connect: { ca: ts.certs.ca, cert: ts.certs.clientCert, key: ts.certs.clientKey },
    }),
  };
}

/** Log the bootstrap admin in (scope `*`, default tenant). */
export async function adminLogin(transport: Transport): Promise<string> {
  return (await createClient(UserService, transport).login({ username: "admin", password: ADMIN_PASSWORD }))
    .accessToken;
}

/** A tenant with an application and a tenant admin holding `scopes` (logged in). */
export async function tenantWithAdmin(
  transport: Transport,
  rootToken: string,
  scopes = ["admin:tenants", "admin:machine-users"],
) {
  const root = clients(transport, rootToken);
  const { tenant } = await root.tenants.createTenant({ name: `tenant-${short()}` });
  const { application } = await root.tenants.createApplication({ tenantId: tenant!.id, name: "app-one" });
  const username = `ta-${short()}`;
  await root.users.createUser({ username, password: "tenant admin password", scopes, tenantId: tenant!.id });
  const login = await createClient(UserService, transport).login({
    username,
    password: "tenant admin password",
    tenant: tenant!.id,
  });
  return { tenant: tenant!, application: application!, username, token: login.accessToken };
}

/** A bearer machine user in the caller's (or the given) tenant, assigned to `applicationIds`. */
export async function bearerMachine(
  transport: Transport,
  adminToken: string,
  applicationIds: string[],
  extra: { tenantId?: string; scopes?: string[] } = {},
) {
  const res = await clients(transport, adminToken).machines.createMachineUser({
    name: `mu-${short()}`,
    authType: MachineAuthType.BEARER,
    applicationIds,
    scopes: extra.scopes ?? [],
    ...(extra.tenantId ? { tenantId: extra.tenantId } : {}),
  });
  return { machine: res.machineUser!, token: res.token };
}

/** A Basic machine user. */
export async function basicMachine(
  transport: Transport,
  adminToken: string,
  applicationIds: string[],
  extra: { tenantId?: string } = {},
) {
  const res = await clients(transport, adminToken).machines.createMachineUser({
    name: `mu-${short()}`,
    authType: MachineAuthType.BASIC,
    applicationIds,
    ...(extra.tenantId ? { tenantId: extra.tenantId } : {}),
  });
  return { machine: res.machineUser!, username: res.username, password: res.password };
}

/** A MachineUserService client on one HTTP/2 connection of its own with a client certificate, opened now (before any call on it). */
export async function connectedWithCertificate(
  ts: TestServer,
  pem: { cert: Buffer | string; key: Buffer | string },
) {
  const sessionManager = new Http2SessionManager(
    ts.server.url,
    {},
    { ca: ts.certs.ca, cert: pem.cert, key: pem.key },
  );
  if ((await sessionManager.connect()) === "error") throw new Error("the TLS connection did not open");
  const transport = createConnectTransport({ baseUrl: ts.server.url, httpVersion: "2", sessionManager });
  return { client: createClient(MachineUserService, transport), transport, sessionManager };
}

/** Whether the bearer `credential` authenticates a call over `transport` (else it is refused Unauthenticated). */
export async function authenticates(transport: Transport, credential: string): Promise<boolean> {
  try {
    await clients(transport, credential).machines.checkAuthentication({});
    return true;
  } catch (err) {
    expect(ConnectError.from(err).code).toBe(Code.Unauthenticated);
    return false;
  }
}

/** A machine user of the caller's tenant that may call VerificationService (auth:verify): its token. */
export async function verifierMachine(
  transport: Transport,
  adminToken: string,
  tenantId?: string,
): Promise<string> {
  const res = await clients(transport, adminToken).machines.createMachineUser({
    ...(tenantId !== undefined ? { tenantId } : {}),
    name: `verifier-${short()}`,
    authType: MachineAuthType.BEARER,
    scopes: ["auth:verify"],
  });
  return res.token;
}

/** VerifyCredential's answer to `credential` on each of `servers` (the code's name), asked by `verifier`. */
export function verificationCodes(
  servers: readonly TestServer[],
  verifier: string,
  credential: string,
): Promise<string[]> {
  return Promise.all(
    servers.map(async (ts) => {
      const v = createClient(
        VerificationService,
        withHeaders(ts.connect(), { authorization: `Bearer ${verifier}` }),
      );
      return VerificationCode[(await v.verifyCredential({ credential })).code];
    }),
  );
}

/** The machine user a CheckAuthentication answered with, or its refusal. */
export function authenticatedAs(call: Promise<{ machineUserId: string }>) {
  return call.then(
    (r) => r.machineUserId,
    (err: unknown) => rejection(Promise.reject(err)),
  );
}

/** Clients of the three services, as the bootstrap admin, over TLS without a client certificate. */
export async function adminClients(ts: TestServer): Promise<ReturnType<typeof clients>> {
  const plain = createConnectTransport({
    baseUrl: ts.server.url,
    httpVersion: "2",
    nodeOptions: { ca: ts.certs.ca },
  });
  return clients(plain, await adminLogin(plain));
}

/** A client certificate of the test CA: PEMs, SHA-256 fingerprint (hex) and notAfter (epoch ms). */
export interface ClientPem {
  cert: Buffer;
  key: Buffer;
  fingerprint: string;
  notAfter: number;
}

/** A new client certificate issued by `ts`'s CA, valid `validityDays` (the CA's default when omitted). */
export async function mintClientCertificate(ts: TestServer, validityDays?: number): Promise<ClientPem> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-client-")), "client");
  await createClientCertificate(ts.certs.dir, `client-${short()}`, out, validityDays ? { validityDays } : {});
  const cert = readFileSync(join(out, "client.crt"));
  const parsed = new X509Certificate(cert);
  return {
    cert,
    key: readFileSync(join(out, "client.key")),
    fingerprint: parsed.fingerprint256.replace(/:/g, "").toLowerCase(),
    notAfter: Date.parse(parsed.validTo),
  };
}

/** A new bearer machine user holding `scopes`, bound to the certificate of `fingerprint`; its id. */
export async function boundMachineUser(
  admin: ReturnType<typeof clients>,
  name: string,
  fingerprint: string,
  scopes: string[] = [],
): Promise<string> {
  const mu = (await admin.machines.createMachineUser({ name, authType: MachineAuthType.BEARER, scopes }))
    .machineUser!;
  await admin.machines.bindCertificate({
    machineUserId: mu.id,
    identity: { case: "sha256Fingerprint", value: fingerprint },
  });
  return mu.id;
}
