import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { MachineAuthType, MachineUserService } from "../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createClientCertificate } from "../src/certs/dev-ca.js";
import { main } from "../src/main.js";
import { Code, rejection } from "./errors-util.js";
import { ADMIN_PASSWORD, createTestCerts, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { clients, short } from "./machine-fixtures.js";

/** What a backend keeps on disk: the SDK's cert-folder layout, nothing else. */
interface CertFolder {
  dir: string;
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
  fingerprint: string;
}

function readFolder(dir: string): CertFolder {
  const cert = readFileSync(join(dir, "client.crt"));
  return {
    dir,
    cert,
    key: readFileSync(join(dir, "client.key")),
    ca: readFileSync(join(dir, "ca.crt")),
    fingerprint: new X509Certificate(cert).fingerprint256.replace(/:/g, "").toLowerCase(),
  };
}

/** `tessera certs client <name> --cert-dir <ca dir> --out <dir> [--san-uri URI]`, as an operator runs it. */
async function mintWithCli(caDir: string, name: string, sanUri?: string): Promise<CertFolder> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-backend-")), name);
  const stdout = vi.spyOn(process.stdout, "write").mockImplementation(() => true);
  try {
    const code = await main([
      "node",
      "tessera",
      "certs",
      "client",
      name,
      "--cert-dir",
      caDir,
      "--out",
      out,
      ...(sanUri ? ["--san-uri", sanUri] : []),
    ]);
    expect(code).toBe(0);
  } finally {
    stdout.mockRestore();
  }
  return readFolder(out);
}

async function mint(caDir: string, name: string, sanUri?: string): Promise<CertFolder> {
  const out = join(mkdtempSync(join(tmpdir(), "tessera-backend-")), name);
  await createClientCertificate(caDir, name, out, sanUri ? { sanUri } : {});
  return readFolder(out);
}

/** A MachineUserService client built the way a polyglot backend would: grpc-js + the .proto files. */
function grpcBackend(port: number, folder: Pick<CertFolder, "ca" | "cert" | "key">) {
  const def = protoLoader.loadSync("tessera/v1/machine_user_service.proto", {
    includeDirs: [resolve("proto")],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as {
    tessera: {
      v1: { MachineUserService: new (target: string, creds: grpc.ChannelCredentials) => grpc.Client };
    };
  };
  const client = new pkg.tessera.v1.MachineUserService(
    `localhost:${port}`,
    grpc.credentials.createSsl(folder.ca, folder.key, folder.cert),
  );
  const call = <T>(method: string, request: object) =>
    new Promise<T>((res, rej) => {
      (
        client as unknown as Record<
          string,
          (r: object, cb: (e: grpc.ServiceError | null, v: T) => void) => void
        >
      )[method]!(request, (err, value) => (err ? rej(err) : res(value)));
    });
  return { client, call };
}

function connectOver(ts: TestServer, folder?: Pick<CertFolder, "cert" | "key">): Transport {
  return createConnectTransport({
    baseUrl: ts.server.url,
    httpVersion: "2",
    nodeOptions: { ca: ts.certs.ca, ...(folder ? { cert: folder.cert, key: folder.key } : {}) },
  });
}

describe.each(DATABASES)("machine principals over mTLS (optional mode) on $name", (db) => {
  let ts: TestServer;
  let root: string;
  let tenantId: string;
  let applicationId: string;
  let machineId: string;
  let backend: CertFolder;
  let admin: ReturnType<typeof clients>;

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } }, await createTestCerts("unused"));
    const plain = connectOver(ts);
    root = (await createClient(UserService, plain).login({ username: "admin", password: ADMIN_PASSWORD }))
      .accessToken;
    admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `payments-${short()}` });
    tenantId = tenant!.id;
    applicationId = (await admin.tenants.createApplication({ tenantId, name: "payments" })).application!.id;
    const mu = await admin.machines.createMachineUser({
      tenantId,
      name: "payments-backend",
      authType: MachineAuthType.BEARER,
      applicationIds: [applicationId],
    });
    machineId = mu.machineUser!.id;
    backend = await mintWithCli(ts.certs.dir, "payments-backend");
    await admin.machines.bindCertificate({
      machineUserId: machineId,
      identity: { case: "sha256Fingerprint", value: backend.fingerprint },
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  it("serves a backend holding only client.crt, client.key and ca.crt over grpc-js: CheckAuthentication and RegisterBackend", async () => {
    const { client, call } = grpcBackend(ts.server.port, backend);
    try {
      const check = await call<Record<string, unknown>>("CheckAuthentication", {});
      expect(check).toEqual({
        authenticated: true,
        machine_user_id: machineId,
        tenant_id: tenantId,
        message: "Authentication successful",
      });
      const reg = await call<Record<string, unknown>>("RegisterBackend", {
        callback_url: "https://payments.internal.example.com/triggers",
        version: "1.0.0",
        application_id: applicationId,
      });
      expect(reg.success).toBe(true);
      expect(reg.message).toBe("Backend registered successfully");
      const again = await call<Record<string, unknown>>("RegisterBackend", {
        callback_url: "https://payments.internal.example.com/triggers",
        version: "1.0.1",
        application_id: applicationId,
      });
      expect(again.backend_id).toBe(reg.backend_id);
      const listed = await admin.machines.listBackends({ machineUserId: machineId });
      expect(listed.backends.map((b) => [b.id, b.version])).toEqual([[reg.backend_id, "1.0.1"]]);
    } finally {
      client.close();
    }
  });

  it("refuses an application the certificate's machine user is not assigned to", async () => {
    const { application } = await admin.tenants.createApplication({ tenantId, name: `other-${short()}` });
    const { client, call } = grpcBackend(ts.server.port, backend);
    try {
      const err = await call("RegisterBackend", {
        callback_url: "https://x.example.com/",
        version: "1",
        application_id: application!.id,
      }).catch((e: grpc.ServiceError) => e);
      expect((err as grpc.ServiceError).code).toBe(grpc.status.PERMISSION_DENIED);
    } finally {
      client.close();
    }
  });

  it("authenticates a certificate by a bound SAN URI (e.g. a SPIFFE id)", async () => {
    const san = `spiffe://payments.example.org/${short()}`;
    const mu = await admin.machines.createMachineUser({
      tenantId,
      name: `spiffe-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    await admin.machines.bindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "sanUri", value: san },
    });
    const folder = await mintWithCli(ts.certs.dir, "spiffe-backend", san);
    const res = await createClient(MachineUserService, connectOver(ts, folder)).checkAuthentication({});
    expect(res.machineUserId).toBe(mu.machineUser!.id);
    // A re-issued certificate with the same SAN (a new key, a new fingerprint) is the same machine user.
    const reissued = await mint(ts.certs.dir, "spiffe-backend-2", san);
    expect(reissued.fingerprint).not.toBe(folder.fingerprint);
    expect(
      (await createClient(MachineUserService, connectOver(ts, reissued)).checkAuthentication({}))
        .machineUserId,
    ).toBe(mu.machineUser!.id);
  });

  it("authenticates nobody with a CA-signed certificate bound to no machine user", async () => {
    const stranger = await mint(ts.certs.dir, "stranger");
    const r = await rejection(
      createClient(MachineUserService, connectOver(ts, stranger)).checkAuthentication({}),
    );
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("AUTH_REQUIRED");
  });

  it("authenticates nobody with a certificate from another CA, even when its fingerprint is bound", async () => {
    const foreign = await createTestCerts("intruder");
    const mu = await admin.machines.createMachineUser({
      tenantId,
      name: `intruder-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    await admin.machines.bindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: foreign.clientFingerprint },
    });
    const r = await rejection(
      createClient(
        MachineUserService,
        connectOver(ts, { cert: foreign.clientCert, key: foreign.clientKey }),
      ).checkAuthentication({}),
    );
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("AUTH_REQUIRED");
  });

  it("lets header credentials take precedence over the connection's certificate", async () => {
    const withCert = connectOver(ts, backend);
    const me = await createClient(UserService, withCert).getCurrentUser(
      {},
      { headers: { authorization: `Bearer ${root}` } },
    );
    expect(me.username).toBe("admin");
    expect(me.clientCertificate?.sha256Fingerprint).toBe(backend.fingerprint);
    const asUser = await rejection(clients(withCert, root).machines.checkAuthentication({}));
    expect(asUser.reason).toBe("PRINCIPAL_NOT_ALLOWED");
    const other = await admin.machines.createMachineUser({
      tenantId,
      name: `header-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    expect((await clients(withCert, other.token).machines.checkAuthentication({})).machineUserId).toBe(
      other.machineUser!.id,
    );
  });

  it("keeps an mTLS machine principal away from admin and user RPCs", async () => {
    const m = clients(connectOver(ts, backend));
    for (const call of [
      () => m.users.getCurrentUser({}),
      () => m.machines.listMachineUsers({}),
      () => m.tenants.listTenants({}),
    ]) {
      const r = await rejection(call());
      expect(r.code).toBe(Code.PermissionDenied);
      expect(r.reason).toBe("PRINCIPAL_NOT_ALLOWED");
    }
  });

  it("binds an access token issued over mTLS to the certificate and refuses it on a connection without it", async () => {
    const withCert = connectOver(ts, backend);
    const issued = await createClient(MachineUserService, withCert).issueAccessToken({});
    expect(issued.certificateBound).toBe(true);
    const thumbprint = createHash("sha256").update(new X509Certificate(backend.cert).raw).digest("base64url");
    expect(decodeJwt(issued.accessToken).cnf).toEqual({ "x5t#S256": thumbprint });

    expect((await clients(withCert, issued.accessToken).machines.checkAuthentication({})).machineUserId).toBe(
      machineId,
    );

    const without = await rejection(
      clients(connectOver(ts), issued.accessToken).machines.checkAuthentication({}),
    );
    expect(without.code).toBe(Code.Unauthenticated);
    expect(without.reason).toBe("TOKEN_NOT_BOUND");
    expect(without.error.metadata.get("www-authenticate")).toContain('error="invalid_token"');

    const otherCert = await mint(ts.certs.dir, "another-holder");
    const elsewhere = await rejection(
      clients(connectOver(ts, otherCert), issued.accessToken).machines.checkAuthentication({}),
    );
    expect(elsewhere.reason).toBe("TOKEN_NOT_BOUND");
  });

  it("answers a refused bound token over plain HTTP with 401 and an invalid_token challenge", async () => {
    const issued = await createClient(MachineUserService, connectOver(ts, backend)).issueAccessToken({});
    const { Agent, fetch } = await import("undici");
    const agent = new Agent({ connect: { ca: ts.certs.ca } });
    try {
      const res = await fetch(`${ts.server.url}/tessera.v1.MachineUserService/CheckAuthentication`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${issued.accessToken}` },
        body: "{}",
        dispatcher: agent,
      });
      expect(res.status).toBe(401);
      expect(res.headers.get("www-authenticate")).toContain('error="invalid_token"');
    } finally {
      await agent.close();
    }
  });

  it("cuts an mTLS machine principal off on its next request when disabled, unbound or its tenant disabled", async () => {
    const mu = await admin.machines.createMachineUser({
      tenantId,
      name: `cut-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    const folder = await mint(ts.certs.dir, "cut-backend");
    const { binding } = await admin.machines.bindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: folder.fingerprint },
    });
    const conn = createClient(MachineUserService, connectOver(ts, folder)); // one HTTP/2 connection throughout
    expect((await conn.checkAuthentication({})).machineUserId).toBe(mu.machineUser!.id);

    await admin.machines.updateMachineUser({ id: mu.machineUser!.id, disabled: true });
    expect((await rejection(conn.checkAuthentication({}))).reason).toBe("PRINCIPAL_DISABLED");
    await admin.machines.updateMachineUser({ id: mu.machineUser!.id, disabled: false });
    expect((await conn.checkAuthentication({})).authenticated).toBe(true);

    await admin.tenants.updateTenant({ id: tenantId, disabled: true });
    try {
      expect((await rejection(conn.checkAuthentication({}))).reason).toBe("PRINCIPAL_DISABLED");
    } finally {
      await admin.tenants.updateTenant({ id: tenantId, disabled: false });
    }

    await admin.machines.unbindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "bindingId", value: binding!.id },
    });
    expect((await rejection(conn.checkAuthentication({}))).reason).toBe("AUTH_REQUIRED");
  });

  it("refuses an access token the certificate obtained once the certificate is unbound", async () => {
    const mu = await admin.machines.createMachineUser({
      tenantId,
      name: `unbound-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    const folder = await mint(ts.certs.dir, "unbound-backend");
    const { binding } = await admin.machines.bindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: folder.fingerprint },
    });
    const withCert = connectOver(ts, folder);
    const { accessToken } = await createClient(MachineUserService, withCert).issueAccessToken({});
    const bearer = clients(withCert, accessToken).machines;
    expect((await bearer.checkAuthentication({})).machineUserId).toBe(mu.machineUser!.id);

    await admin.machines.unbindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "bindingId", value: binding!.id },
    });
    // The certificate is still CA-valid and still on the connection: only the unbinding
    // stands between its holder and the machine user.
    expect((await rejection(bearer.checkAuthentication({}))).reason).toBe("TOKEN_REVOKED");
  });

  it("cuts an mTLS machine principal off on its next request when deleted", async () => {
    const mu = await admin.machines.createMachineUser({
      tenantId,
      name: `del-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    const folder = await mint(ts.certs.dir, "del-backend");
    await admin.machines.bindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: folder.fingerprint },
    });
    const conn = createClient(MachineUserService, connectOver(ts, folder));
    const { accessToken } = await conn.issueAccessToken({});
    await admin.machines.deleteMachineUser({ id: mu.machineUser!.id });
    expect((await rejection(conn.checkAuthentication({}))).reason).toBe("AUTH_REQUIRED");
    const jwt = await rejection(
      clients(connectOver(ts, folder), accessToken).machines.checkAuthentication({}),
    );
    expect(jwt.reason).toBe("TOKEN_REVOKED");
  });
});

describe.each(DATABASES)("machine principals over mTLS (require mode) on $name", (db) => {
  let ts: TestServer;
  let backend: CertFolder;

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "require" } });
    // In require mode even the admin needs a client certificate to connect.
    const adminCert = { cert: ts.certs.clientCert, key: ts.certs.clientKey };
    const conn = connectOver(ts, adminCert);
    const root = (
      await createClient(UserService, conn).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
    const admin = clients(conn, root);
    const { application } = await admin.tenants.createApplication({ name: `app-${short()}` });
    const mu = await admin.machines.createMachineUser({
      name: "required",
      authType: MachineAuthType.BASIC,
      applicationIds: [application!.id],
    });
    backend = await mintWithCli(ts.certs.dir, "required-backend");
    await admin.machines.bindCertificate({
      machineUserId: mu.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: backend.fingerprint },
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  it("serves a bound backend certificate over grpc-js", async () => {
    const { client, call } = grpcBackend(ts.server.port, backend);
    try {
      const check = await call<Record<string, unknown>>("CheckAuthentication", {});
      expect(check.authenticated).toBe(true);
      expect(check.message).toBe("Authentication successful");
    } finally {
      client.close();
    }
  });

  it("refuses a certificate from another CA at the handshake", async () => {
    const foreign = await createTestCerts("intruder");
    const { client, call } = grpcBackend(ts.server.port, {
      ca: ts.certs.ca,
      cert: foreign.clientCert,
      key: foreign.clientKey,
    });
    try {
      const err = (await call("CheckAuthentication", {}).catch(
        (e: grpc.ServiceError) => e,
      )) as grpc.ServiceError;
      expect(err.code).toBe(grpc.status.UNAVAILABLE);
    } finally {
      client.close();
    }
  });
});
