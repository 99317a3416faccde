import { connect } from "node:http2";
import { request } from "node:https";
import { join } from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import {
  VerificationCode,
  VerificationService,
  VerifiedPrincipalKind,
} from "../gen/tessera/v1/verification_service_pb.js";
import { generateToken } from "../src/auth/token-format.js";
import { type AuditEventFilter, AuditEventRepository } from "../src/storage/repositories/audit.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  startTestServer,
  type TestServer,
  withHeaders,
} from "./helpers.js";
import { adminLogin, basic, clients, short } from "./machine-fixtures.js";

/**
 * VerifyCredential and /oauth2/introspect against a real server over TLS: every code over
 * Connect and over an independent gRPC client (@grpc/grpc-js loading the .proto), the tenant
 * wall, the caller's own refusals, and each client authentication of introspection.
 */
const PROTO_DIR = join(import.meta.dirname, "..", "proto");

interface GrpcAnswer {
  valid: boolean;
  code: string;
  principal_id: string;
  tenant_id: string;
  scopes: string[];
  credential_kind: string;
}
interface GrpcVerifier extends grpc.Client {
  VerifyCredential(
    req: object,
    md: grpc.Metadata,
    cb: (err: grpc.ServiceError | null, res: GrpcAnswer) => void,
  ): void;
}

function grpcVerifier(port: number, ca: Buffer): GrpcVerifier {
  const def = protoLoader.loadSync("tessera/v1/verification_service.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  // biome-ignore lint/suspicious/noExplicitAny: grpc-js package definitions are untyped
  const pkg = grpc.loadPackageDefinition(def) as any;
  return new pkg.tessera.v1.VerificationService(
    `localhost:${port}`,
    grpc.credentials.createSsl(ca),
  ) as GrpcVerifier;
}

/** One plain HTTPS request (HTTP/1.1), with an optional client certificate. */
function post(
  ts: TestServer,
  path: string,
  body: string,
  headers: Record<string, string>,
  opts: { clientCert?: boolean; method?: string } = {},
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; json: unknown }> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${ts.server.url}${path}`,
      {
        method: opts.method ?? "POST",
        ca: ts.certs.ca,
        ...(opts.clientCert ? { cert: ts.certs.clientCert, key: ts.certs.clientKey } : {}),
        headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            json: text ? JSON.parse(text) : null,
          });
        });
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

const form = (fields: Record<string, string>) => new URLSearchParams(fields).toString();
const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

describe.each(DATABASES)("credential verification on $name", (db) => {
  let ts: TestServer;
  let plain: Transport;
  let root: string;
  let tenantId: string;
  let applicationId: string;
  let otherApplicationId: string;
  /** A machine user of the tenant holding auth:verify, and its token. */
  let verifierToken: string;
  let verifierBasic: Record<string, string>;
  let verifierPair: { username: string; password: string };
  let superVerifierToken: string;
  const creds: Record<string, string> = {};
  let userId: string;
  let machineId: string;
  let foreignPat: string;
  let grpcClient: GrpcVerifier;

  /** Verify over Connect as `token` (the tenant's verifier by default). */
  async function viaConnect(credential: string, extra: object = {}, token = verifierToken) {
    return clientFor(VerificationService, plain, token).verifyCredential({ credential, ...extra });
  }
  function viaGrpc(credential: string, extra: object = {}, token = verifierToken): Promise<GrpcAnswer> {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${token}`);
    return new Promise((resolve, reject) =>
      grpcClient.VerifyCredential({ credential, ...extra }, md, (err, res) =>
        err ? reject(err) : resolve(res),
      ),
    );
  }
  /** The code over both protocols (they must agree). */
  async function codeOf(credential: string, extra: object = {}, token = verifierToken): Promise<string> {
    const [c, g] = await Promise.all([
      viaConnect(credential, extra, token),
      viaGrpc(credential, extra, token),
    ]);
    const connectCode = VerificationCode[c.code];
    expect(g.code).toBe(connectCode);
    expect(g.valid).toBe(c.valid);
    return VerificationCode[c.code];
  }

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    plain = ts.connect();
    grpcClient = grpcVerifier(ts.server.port, ts.certs.ca);
    root = await adminLogin(plain);
    const admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `verify-${short()}` });
    tenantId = tenant!.id;
    applicationId = (await admin.tenants.createApplication({ tenantId, name: "workflows" })).application!.id;
    otherApplicationId = (await admin.tenants.createApplication({ tenantId, name: "billing" })).application!
      .id;

    const verifier = await admin.machines.createMachineUser({
      tenantId,
      name: `verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    verifierToken = verifier.token;
    const basicVerifier = await admin.machines.createMachineUser({
      tenantId,
      name: `basic-verifier-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["auth:verify"],
    });
    verifierBasic = basic(basicVerifier.username, basicVerifier.password);
    verifierPair = { username: basicVerifier.username, password: basicVerifier.password };
    const certVerifier = await admin.machines.createMachineUser({
      tenantId,
      name: `cert-verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    await admin.machines.bindCertificate({
      machineUserId: certVerifier.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
    });
    superVerifierToken = (
      await admin.machines.createMachineUser({
        name: `super-verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["*"],
      })
    ).token;

    // The credentials to verify, all in the tenant.
    const username = `alice-${short()}`;
    userId = (
      await admin.users.createUser({
        username,
        password: "alice password long",
        scopes: ["workflows:read", "workflows:run"],
        tenantId,
      })
    ).user!.id;
    const login = await createClient(UserService, plain).login({
      username,
      password: "alice password long",
      tenant: tenantId,
    });
    creds.jwt = login.accessToken;
    const tokens = clientFor(TokenService, plain, creds.jwt);
    creds.pat = (await tokens.createPersonalAccessToken({ name: "cli", scopes: ["workflows:read"] })).token;
    creds.apiKey = (await tokens.createApiKey({ name: "integration" })).key;
    const machine = await admin.machines.createMachineUser({
      tenantId,
      name: `worker-${short()}`,
      authType: MachineAuthType.BEARER,
      applicationIds: [applicationId],
      scopes: ["workflows:run"],
    });
    machineId = machine.machineUser!.id;
    creds.machineToken = machine.token;
    creds.machineJwt = (await clients(plain, machine.token).machines.issueAccessToken({})).accessToken;
    const basicMachine = await admin.machines.createMachineUser({
      tenantId,
      name: `basic-worker-${short()}`,
      authType: MachineAuthType.BASIC,
      applicationIds: [applicationId],
    });
    creds.basic = `Basic ${Buffer.from(`${basicMachine.username}:${basicMachine.password}`).toString("base64")}`;

    // Another tenant's personal access token.
    const { tenant: other } = await admin.tenants.createTenant({ name: `other-${short()}` });
    const bob = `bob-${short()}`;
    await admin.users.createUser({ username: bob, password: "bob password long", tenantId: other!.id });
    const bobJwt = (
      await createClient(UserService, plain).login({
        username: bob,
        password: "bob password long",
        tenant: other!.id,
      })
    ).accessToken;
    foreignPat = (await clientFor(TokenService, plain, bobJwt).createPersonalAccessToken({ name: "bob" }))
      .token;
  });
  afterAll(async () => {
    grpcClient?.close();
    await ts?.close();
  });

  it("answers VALID for each kind of credential, with its principal, tenant, scopes and kind", async () => {
    const expected: Record<string, { kind: string; principal: string; type: VerifiedPrincipalKind }> = {
      jwt: { kind: "jwt", principal: userId, type: VerifiedPrincipalKind.USER },
      pat: { kind: "pat", principal: userId, type: VerifiedPrincipalKind.USER },
      apiKey: { kind: "api_key", principal: userId, type: VerifiedPrincipalKind.USER },
      machineToken: { kind: "machine_token", principal: machineId, type: VerifiedPrincipalKind.MACHINE_USER },
      machineJwt: { kind: "jwt", principal: machineId, type: VerifiedPrincipalKind.MACHINE_USER },
    };
    for (const [name, want] of Object.entries(expected)) {
      expect(await codeOf(creds[name]!), name).toBe("VALID");
      const answer = await viaConnect(creds[name]!);
      expect(answer.principalId, name).toBe(want.principal);
      expect(answer.principalKind, name).toBe(want.type);
      expect(answer.tenantId, name).toBe(tenantId);
      expect(answer.credentialKind, name).toBe(want.kind);
      expect(answer.credentialId, name).not.toBe("");
    }
    expect((await viaConnect(creds.pat!)).scopes).toEqual(["workflows:read"]);
    expect((await viaConnect(creds.jwt!)).expiresAt).toBeDefined();
    expect((await viaConnect(creds.machineToken!)).applicationIds).toEqual([applicationId]);
    expect(await codeOf(creds.basic!)).toBe("VALID");
    // "Bearer " in front is accepted as well.
    expect(await codeOf(`Bearer ${creds.pat}`)).toBe("VALID");
  });

  it('names the code in Connect JSON as the issue pins it: "code":"VALID", "code":"NOT_FOUND"', async () => {
    const session = connect(ts.server.url, { ca: ts.certs.ca });
    const json = (credential: string) =>
      new Promise<string>((resolve, reject) => {
        const req = session.request({
          ":method": "POST",
          ":path": "/tessera.v1.VerificationService/VerifyCredential",
          "content-type": "application/json",
          authorization: `Bearer ${verifierToken}`,
        });
        const chunks: Buffer[] = [];
        req.on("data", (c: Buffer) => chunks.push(c));
        req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
        req.on("error", reject);
        req.end(JSON.stringify({ credential }));
      });
    try {
      const valid = await json(creds.pat!);
      expect(valid).toContain('"code":"VALID"');
      expect(JSON.parse(valid)).toMatchObject({ valid: true, code: "VALID" });
      const unknown = await json(generateToken("tsr_pat_").token);
      expect(unknown).toContain('"code":"NOT_FOUND"');
      expect(JSON.parse(unknown)).toEqual({ code: "NOT_FOUND" });
    } finally {
      session.close();
    }
  });

  it("answers INSUFFICIENT_SCOPES and NOT_ASSIGNED for a valid credential that does not fit", async () => {
    expect(
      await codeOf(creds.pat!, { required_scopes: ["workflows:run"], requiredScopes: ["workflows:run"] }),
    ).toBe("INSUFFICIENT_SCOPES");
    expect(
      await codeOf(creds.jwt!, { required_scopes: ["workflows:run"], requiredScopes: ["workflows:run"] }),
    ).toBe("VALID");
    const app = (id: string) => ({ application_id: id, applicationId: id });
    expect(await codeOf(creds.machineToken!, app(applicationId))).toBe("VALID");
    expect(await codeOf(creds.machineToken!, app(otherApplicationId))).toBe("NOT_ASSIGNED");
    expect(await codeOf(creds.jwt!, app(applicationId))).toBe("NOT_ASSIGNED");
  });

  it("answers NOT_FOUND for well-formed credentials Tessera does not know, and MALFORMED for anything else", async () => {
    expect(await codeOf(generateToken("tsr_pat_").token)).toBe("NOT_FOUND");
    expect(await codeOf(generateToken("tsr_mu_").token)).toBe("NOT_FOUND");
    const pat = creds.pat!;
    expect(await codeOf(`${creds.jwt!.slice(0, -4)}AAAA`)).toBe("NOT_FOUND");
    expect(await codeOf(`Basic ${Buffer.from("mu_nobody:wrong").toString("base64")}`)).toBe("NOT_FOUND");
    // A human user's password is not for other services to test.
    expect(await codeOf(`Basic ${Buffer.from(`admin:${ADMIN_PASSWORD}`).toString("base64")}`)).toBe(
      "NOT_FOUND",
    );
    for (const bad of [
      "garbage",
      `${pat.slice(0, -1)}${pat.endsWith("A") ? "B" : "A"}`,
      "Basic !!!",
      "x".repeat(3000),
    ])
      expect(await codeOf(bad)).toBe("MALFORMED");
  });

  it("answers EXPIRED for an expired token", async () => {
    const expired = await ts.app.jwt.issue({
      subject: userId,
      tenantId,
      scopes: ["workflows:read"],
      kind: "user",
      ttlSeconds: -60,
    });
    expect(await codeOf(expired.token)).toBe("EXPIRED");
  });

  it("answers REVOKED on the very next verification once a personal access token is revoked", async () => {
    const tokens = clientFor(TokenService, plain, creds.jwt!);
    const created = await tokens.createPersonalAccessToken({ name: `revoke-${short()}` });
    expect(await codeOf(created.token)).toBe("VALID");
    await tokens.revokePersonalAccessToken({ id: created.id });
    expect(await codeOf(created.token)).toBe("REVOKED");
  });

  it("answers DISABLED for a disabled owner and TENANT_DISABLED for a disabled tenant", async () => {
    const admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `doomed-${short()}` });
    const username = `carol-${short()}`;
    const carol = await admin.users.createUser({
      username,
      password: "carol password long",
      tenantId: tenant!.id,
    });
    const jwt = (
      await createClient(UserService, plain).login({
        username,
        password: "carol password long",
        tenant: tenant!.id,
      })
    ).accessToken;
    const pat = (await clientFor(TokenService, plain, jwt).createPersonalAccessToken({ name: "c" })).token;
    // The superuser verifier sees every tenant.
    expect(await codeOf(pat, {}, superVerifierToken)).toBe("VALID");
    await admin.users.updateUser({ id: carol.user!.id, disabled: true });
    expect(await codeOf(pat, {}, superVerifierToken)).toBe("DISABLED");
    await admin.users.updateUser({ id: carol.user!.id, disabled: false });
    await admin.tenants.updateTenant({ id: tenant!.id, disabled: true });
    expect(await codeOf(pat, {}, superVerifierToken)).toBe("TENANT_DISABLED");
  });

  it("answers another tenant's credential exactly like one that does not exist, unless the caller holds *", async () => {
    const unknown = await viaConnect(generateToken("tsr_pat_").token);
    const foreign = await viaConnect(foreignPat);
    expect(foreign).toEqual(unknown);
    expect(await codeOf(foreignPat)).toBe("NOT_FOUND");
    expect(await codeOf(foreignPat, {}, superVerifierToken)).toBe("VALID");
    // Verified once by the superuser (its secret now cached): still NOT_FOUND behind the wall.
    expect(await codeOf(foreignPat)).toBe("NOT_FOUND");
  });

  it("refuses another tenant's credential before its secret is looked at, as an unknown one (same work)", async () => {
    const admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `far-${short()}` });
    const dave = `dave-${short()}`;
    await admin.users.createUser({ username: dave, password: "dave password long", tenantId: tenant!.id });
    const jwt = (
      await createClient(UserService, plain).login({
        username: dave,
        password: "dave password long",
        tenant: tenant!.id,
      })
    ).accessToken;
    // Never verified: its first verification would need PBKDF2 (a miss of the secret cache).
    const fresh = (await clientFor(TokenService, plain, jwt).createPersonalAccessToken({ name: "d" })).token;
    // The verifying caller's own token verified first (its first use is a miss too).
    expect(await codeOf(generateToken("tsr_pat_").token)).toBe("NOT_FOUND");
    const before = ts.app.secrets.stats();
    expect(await codeOf(fresh)).toBe("NOT_FOUND");
    expect(await codeOf(generateToken("tsr_pat_").token)).toBe("NOT_FOUND");
    // (Hits are the verifying caller's own token.)
    expect(ts.app.secrets.stats().misses).toBe(before.misses);
    // The superuser's verification of it does reach the secret.
    expect(await codeOf(fresh, {}, superVerifierToken)).toBe("VALID");
    expect(ts.app.secrets.stats().misses).toBeGreaterThan(before.misses);
  });

  it("refuses a caller without auth:verify, and a user principal", async () => {
    const admin = clients(plain, root);
    const noScope = await admin.machines.createMachineUser({
      tenantId,
      name: `plain-${short()}`,
      authType: MachineAuthType.BEARER,
    });
    const denied = await viaConnect(creds.pat!, {}, noScope.token).catch((e: unknown) =>
      ConnectError.from(e),
    );
    expect((denied as ConnectError).code).toBe(Code.PermissionDenied);
    const grpcDenied = await viaGrpc(creds.pat!, {}, noScope.token).catch((e: grpc.ServiceError) => e);
    expect((grpcDenied as grpc.ServiceError).code).toBe(grpc.status.PERMISSION_DENIED);
    // The root admin holds `*` but is a user: the rule admits machine principals only.
    const user = await viaConnect(creds.pat!, {}, root).catch((e: unknown) => ConnectError.from(e));
    expect((user as ConnectError).code).toBe(Code.PermissionDenied);
    const anonymous = await createClient(VerificationService, plain)
      .verifyCredential({ credential: creds.pat! })
      .catch((e: unknown) => ConnectError.from(e));
    expect((anonymous as ConnectError).code).toBe(Code.Unauthenticated);
  });

  it("audits each verification as credential.verify with the code, never the credential", async () => {
    await viaConnect(creds.pat!);
    await viaConnect(generateToken("tsr_pat_").token);
    await ts.app.audit.flush();
    const repo = new AuditEventRepository(ts.app.sql);
    const filter: AuditEventFilter = { action: "credential.verify", tenantId };
    const rows = await repo.list(filter, 500);
    const reasons = new Set(rows.map((r) => r.reason));
    expect(reasons.has("VALID")).toBe(true);
    expect(reasons.has("NOT_FOUND")).toBe(true);
    const text = JSON.stringify(rows);
    for (const secret of Object.values(creds)) expect(text).not.toContain(secret.slice(-20));
  });

  describe("POST /oauth2/introspect", () => {
    it("answers an active token's members to a client authenticated by a bearer token with auth:verify", async () => {
      const res = await post(ts, "/oauth2/introspect", form({ token: creds.pat! }), bearer(verifierToken));
      expect(res.status).toBe(200);
      expect(res.headers["cache-control"]).toBe("no-store");
      expect(res.json).toMatchObject({
        active: true,
        scope: "workflows:read",
        sub: userId,
        token_type: "Bearer",
        tenant_id: tenantId,
      });
      const jwt = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.machineJwt! }),
        bearer(verifierToken),
      );
      expect(jwt.json).toMatchObject({
        active: true,
        sub: machineId,
        client_id: machineId,
        tenant_id: tenantId,
      });
      expect(typeof (jwt.json as { exp: number }).exp).toBe("number");
      expect(typeof (jwt.json as { iat: number }).iat).toBe("number");
    });

    it("is served over HTTP/2 as well", async () => {
      const session = connect(ts.server.url, { ca: ts.certs.ca });
      try {
        const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
          const req = session.request({
            ":method": "POST",
            ":path": "/oauth2/introspect",
            "content-type": "application/x-www-form-urlencoded",
            authorization: `Bearer ${verifierToken}`,
          });
          let status = 0;
          const chunks: Buffer[] = [];
          req.on("response", (h) => {
            status = Number(h[":status"]);
          });
          req.on("data", (c: Buffer) => chunks.push(c));
          req.on("end", () => resolve({ status, body: Buffer.concat(chunks).toString("utf8") }));
          req.on("error", reject);
          req.end(form({ token: creds.apiKey! }));
        });
        expect(answer.status).toBe(200);
        expect(JSON.parse(answer.body)).toMatchObject({ active: true, sub: userId });
      } finally {
        session.close();
      }
    });

    it("authenticates the client by a machine user's Basic pair and by a bound client certificate", async () => {
      const byBasic = await post(ts, "/oauth2/introspect", form({ token: creds.jwt! }), verifierBasic);
      expect(byBasic.status).toBe(200);
      expect(byBasic.json).toMatchObject({ active: true, sub: userId });
      const byCert = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.machineToken!, token_type_hint: "access_token" }),
        {},
        { clientCert: true },
      );
      expect(byCert.status).toBe(200);
      expect(byCert.json).toMatchObject({ active: true, sub: machineId });
    });

    it("names the certificate binding of a bound token (cnf x5t#S256)", async () => {
      const bound = await ts.app.jwt.issue({
        subject: machineId,
        tenantId,
        scopes: [],
        kind: "machine",
        certificateThumbprint: "q1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0u1v",
      });
      const res = await post(ts, "/oauth2/introspect", form({ token: bound.token }), bearer(verifierToken));
      expect(res.json).toMatchObject({
        active: true,
        cnf: { "x5t#S256": "q1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0u1v" },
      });
      expect((await viaConnect(bound.token)).certificateThumbprint).toBe(
        "q1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0u1v",
      );
    });

    it('answers {"active": false} for every invalid token, whatever the reason', async () => {
      const revoked = await clientFor(TokenService, plain, creds.jwt!).createPersonalAccessToken({
        name: `gone-${short()}`,
      });
      await clientFor(TokenService, plain, creds.jwt!).revokePersonalAccessToken({ id: revoked.id });
      const expired = await ts.app.jwt.issue({
        subject: userId,
        tenantId,
        scopes: [],
        kind: "user",
        ttlSeconds: -60,
      });
      for (const token of [
        generateToken("tsr_pat_").token,
        revoked.token,
        expired.token,
        foreignPat,
        "garbage",
        `${creds.jwt!.slice(0, -4)}AAAA`,
        "tsr_rt_notarefreshtokenatall",
      ]) {
        const res = await post(ts, "/oauth2/introspect", form({ token }), bearer(verifierToken));
        expect(res.status).toBe(200);
        expect(res.json).toEqual({ active: false });
      }
    });

    it("answers 401 with WWW-Authenticate for bad client authentication, 403 without auth:verify", async () => {
      const none = await post(ts, "/oauth2/introspect", form({ token: creds.pat! }), {});
      expect(none.status).toBe(401);
      expect(none.headers["www-authenticate"]).toMatch(/^Bearer realm="tessera"/);
      expect(none.json).toMatchObject({ error: "invalid_client" });
      const [user] = Object.keys(verifierBasic);
      expect(user).toBe("authorization");
      const wrongBasic = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat! }),
        basic("mu_nobody", "wrong"),
      );
      expect(wrongBasic.status).toBe(401);
      expect(wrongBasic.headers["www-authenticate"]).toBe('Basic realm="tessera"');
      const badBearer = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat! }),
        bearer(generateToken("tsr_mu_").token),
      );
      expect(badBearer.status).toBe(401);
      expect(badBearer.headers["www-authenticate"]).toMatch(/error="invalid_token"/);
      const userClient = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat! }),
        bearer(creds.pat!),
      );
      expect(userClient.status).toBe(403);
      const noScope = await clients(plain, root).machines.createMachineUser({
        tenantId,
        name: `plain-${short()}`,
        authType: MachineAuthType.BEARER,
      });
      const forbidden = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat! }),
        bearer(noScope.token),
      );
      expect(forbidden.status).toBe(403);
      expect(forbidden.headers["www-authenticate"]).toMatch(/insufficient_scope/);
    });

    it("authenticates the client by client_secret_post too, as the discovery document advertises", async () => {
      const res = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat!, client_id: verifierPair.username, client_secret: verifierPair.password }),
        {},
      );
      expect(res.status).toBe(200);
      expect(res.json).toMatchObject({ active: true, sub: userId });
      const wrong = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat!, client_id: verifierPair.username, client_secret: "wrong" }),
        {},
      );
      expect(wrong.status).toBe(401);
      expect(wrong.json).toMatchObject({ error: "invalid_client" });
      expect(JSON.stringify(wrong.json)).not.toContain(creds.pat!);
    });

    it("challenges both schemes it takes when no client authentication is sent, and refuses two at once", async () => {
      const none = await post(ts, "/oauth2/introspect", form({ token: creds.pat! }), {});
      expect(none.headers["www-authenticate"]).toBe('Bearer realm="tessera", Basic realm="tessera"');
      const both = await post(
        ts,
        "/oauth2/introspect",
        form({ token: creds.pat!, client_id: verifierPair.username, client_secret: verifierPair.password }),
        bearer(verifierToken),
      );
      expect(both.status).toBe(400);
      expect(both.json).toMatchObject({ error: "invalid_request" });
    });

    it("answers 400 invalid_request for a request without exactly one token, and 405 for GET", async () => {
      const missing = await post(ts, "/oauth2/introspect", form({}), bearer(verifierToken));
      expect(missing.status).toBe(400);
      expect(missing.json).toMatchObject({ error: "invalid_request" });
      const twice = await post(ts, "/oauth2/introspect", "token=a&token=b", bearer(verifierToken));
      expect(twice.status).toBe(400);
      const json = await post(ts, "/oauth2/introspect", JSON.stringify({ token: creds.pat }), {
        ...bearer(verifierToken),
        "content-type": "application/json",
      });
      expect(json.status).toBe(400);
      const get = await post(ts, "/oauth2/introspect", "", bearer(verifierToken), { method: "GET" });
      expect(get.status).toBe(405);
    });
  });

  it("keeps the verified principal's expiry as a timestamp", async () => {
    const tokens = clientFor(TokenService, plain, creds.jwt!);
    const at = Date.now() + 3_600_000;
    const created = await tokens.createPersonalAccessToken({
      name: `exp-${short()}`,
      expiresAt: timestampFromMs(at),
    });
    const answer = await viaConnect(created.token);
    expect(Number(answer.expiresAt!.seconds)).toBe(Math.floor(at / 1000));
  });
});

describe.each(DATABASES)("failed verifications with rate limits on ($name)", (db) => {
  let ts: TestServer;
  let verifierToken: string;
  let pat: string;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { enabled: true, authFailuresPerIpPerMinute: 3, perIpPerMinute: 10_000 },
    });
    const plain = ts.connect();
    const root = await adminLogin(plain);
    const admin = clients(plain, root);
    verifierToken = (
      await admin.machines.createMachineUser({
        name: `verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    pat = (await clientFor(TokenService, plain, root).createPersonalAccessToken({ name: "p" })).token;
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("spends the caller's failed-authentication budget, then answers RATE_LIMITED, while the caller itself still authenticates", async () => {
    const verification = createClient(VerificationService, withHeaders(ts.connect(), bearer(verifierToken)));
    // First use: its PBKDF2 reserves a point, given back once it verifies.
    expect(VerificationCode[(await verification.verifyCredential({ credential: pat })).code]).toBe("VALID");
    const codes: string[] = [];
    for (let i = 0; i < 5; i++)
      codes.push(
        VerificationCode[
          (await verification.verifyCredential({ credential: generateToken("tsr_pat_").token })).code
        ],
      );
    expect(codes.slice(0, 3)).toEqual(["NOT_FOUND", "NOT_FOUND", "NOT_FOUND"]);
    expect(codes.slice(3)).toEqual(["RATE_LIMITED", "RATE_LIMITED"]);
    const limited = await verification.verifyCredential({ credential: generateToken("tsr_pat_").token });
    expect(limited.retryAfterSeconds).toBeGreaterThan(0);
    // The same over the independent gRPC client.
    const client = grpcVerifier(ts.server.port, ts.certs.ca);
    try {
      const md = new grpc.Metadata();
      md.set("authorization", `Bearer ${verifierToken}`);
      const answer = await new Promise<GrpcAnswer>((resolve, reject) =>
        client.VerifyCredential({ credential: generateToken("tsr_pat_").token }, md, (err, res) =>
          err ? reject(err) : resolve(res),
        ),
      );
      expect(answer.code).toBe("RATE_LIMITED");
    } finally {
      client.close();
    }
    // A known credential verifies without spending anything (no PBKDF2 to reserve for).
    expect(VerificationCode[(await verification.verifyCredential({ credential: pat })).code]).toBe("VALID");
  });

  it("spends the same budget at /oauth2/introspect, then answers 429 with Retry-After there, never active: false", async () => {
    const own = (
      await clients(ts.connect(), await adminLogin(ts.connect())).machines.createMachineUser({
        name: `introspector-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    const statuses: number[] = [];
    for (let i = 0; i < 3; i++) {
      const res = await post(ts, "/oauth2/introspect", form({ token: generateToken("tsr_pat_").token }), {
        ...bearer(own),
      });
      statuses.push(res.status);
      expect(res.json).toEqual({ active: false });
    }
    expect(statuses).toEqual([200, 200, 200]);
    const limited = await post(
      ts,
      "/oauth2/introspect",
      form({ token: generateToken("tsr_pat_").token }),
      bearer(own),
    );
    expect(limited.status).toBe(429);
    expect(limited.json).toMatchObject({ error: "temporarily_unavailable" });
    expect(Number(limited.headers["retry-after"])).toBeGreaterThan(0);
    // One budget per verifying caller, whichever door it comes through.
    const verification = createClient(VerificationService, withHeaders(ts.connect(), bearer(own)));
    expect(
      VerificationCode[
        (await verification.verifyCredential({ credential: generateToken("tsr_pat_").token })).code
      ],
    ).toBe("RATE_LIMITED");
    // A credential verified before still answers.
    const known = await post(ts, "/oauth2/introspect", form({ token: pat }), bearer(own));
    expect(known.json).toMatchObject({ active: true });
  });
});
