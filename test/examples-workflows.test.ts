import { readFileSync } from "node:fs";
import { request } from "node:https";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { WorkflowService } from "../examples/workflows/gen/workflows/v1/workflow_service_pb.js";
import { startWorkflowServer, type WorkflowServer } from "../examples/workflows/service.js";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { TesseraAuthOptions } from "../src/sdk/server/index.js";
import { DbProxy } from "./db-proxy.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * The example downstream service (examples/workflows) against a real Tessera over TLS,
 * reached through a TCP proxy the test can cut: every kind of credential admitted with its
 * principal, refused once revoked on Tessera, refused for scopes its proto does not grant,
 * certificate-bound tokens only with their certificate, and 503 (never an admission) while
 * Tessera cannot be reached. Over Connect and gRPC, and the JSON route behind the Node
 * middleware, on SQLite and PostgreSQL.
 */

/** The reason in a refusal's google.rpc.ErrorInfo. */
async function refusal(
  p: Promise<unknown>,
): Promise<{ code: Code; reason: string | undefined; retryAfter: string | null }> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ConnectError);
  const e = err as ConnectError;
  return {
    code: e.code,
    reason: e.findDetails(ErrorInfoSchema)[0]?.reason,
    retryAfter: e.metadata.get("retry-after"),
  };
}

/** GET the JSON route (node:https, HTTP/1.1) with an Authorization header. */
function getJson(
  url: string,
  ca: Buffer,
  authorization?: string,
): Promise<{ status: number; headers: Record<string, unknown>; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${url}/v1/workflows`,
      { ca, agent: false, headers: authorization ? { authorization } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown>,
          }),
        );
      },
    );
    req.on("error", reject);
    req.end();
  });
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

describe.each(DATABASES)("the workflows example protected by Tessera on $name", (db) => {
  let ts: TestServer;
  let proxy: DbProxy;
  let workflows: WorkflowServer;
  let tenantId: string;
  let root: string;
  const creds: Record<string, string> = {};
  const ids: Record<string, string> = {};

  /** A workflows client over Connect (or gRPC) with headers, optionally presenting the test client certificate. */
  function wf(headers: Record<string, string>, opts: { grpc?: boolean; clientCert?: boolean } = {}) {
    const nodeOptions = {
      ca: ts.certs.ca,
      ...(opts.clientCert ? { cert: ts.certs.clientCert, key: ts.certs.clientKey } : {}),
    };
    const transport: Transport = opts.grpc
      ? createGrpcTransport({ baseUrl: workflows.url, nodeOptions })
      : createConnectTransport({ baseUrl: workflows.url, httpVersion: "2", nodeOptions });
    const client = createClient(WorkflowService, transport);
    return {
      list: () => client.listWorkflows({}, { headers }),
      run: () => client.runWorkflow({ workflowId: "wf-build" }, { headers }),
    };
  }

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    proxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    const plain = ts.connect();
    root = await adminLogin(plain);
    const admin = clients(plain, root);
    tenantId = (await admin.tenants.createTenant({ name: `workflows-${short()}` })).tenant!.id;
    const verifier = await admin.machines.createMachineUser({
      tenantId,
      name: `workflows-service-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });

    // One of each kind of credential, all in the tenant.
    const username = `alice-${short()}`;
    ids.user = (
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
    creds.refresh = login.refreshToken;
    const tokens = clientFor(TokenService, plain, creds.jwt);
    const pat = await tokens.createPersonalAccessToken({ name: "cli", scopes: ["workflows:read"] });
    creds.pat = pat.token;
    ids.pat = pat.id;
    const key = await tokens.createApiKey({ name: "integration" });
    creds.apiKey = key.key;
    ids.apiKey = key.id;
    const machine = await admin.machines.createMachineUser({
      tenantId,
      name: `worker-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["workflows:read", "workflows:run"],
    });
    ids.machine = machine.machineUser!.id;
    creds.machineToken = machine.token;
    const basicMachine = await admin.machines.createMachineUser({
      tenantId,
      name: `basic-worker-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["workflows:read"],
    });
    ids.basicMachine = basicMachine.machineUser!.id;
    creds.basic = `Basic ${Buffer.from(`${basicMachine.username}:${basicMachine.password}`).toString("base64")}`;
    // A machine bound to the test client certificate: over mTLS it gets a bound token.
    const bound = await admin.machines.createMachineUser({
      tenantId,
      name: `bound-worker-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["workflows:read"],
    });
    await admin.machines.bindCertificate({
      machineUserId: bound.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
    });
    const issued = await clients(ts.connect({ clientCert: true }), bound.token).machines.issueAccessToken({});
    expect(issued.certificateBound).toBe(true);
    creds.boundJwt = issued.accessToken;
    ids.bound = bound.machineUser!.id;

    const tessera: TesseraAuthOptions = {
      server: `https://localhost:${proxy.port}`,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier.token,
      clockSkewSeconds: 1,
      verifyTimeoutMs: 1500,
      // Per-call verification: every call asks Tessera (the mode the cache falls back to
      // whenever the revocation stream is down).
      watch: false,
    };
    workflows = await startWorkflowServer({
      cert: readFileSync(join(ts.certs.dir, "server.crt")),
      key: readFileSync(join(ts.certs.dir, "server.key")),
      clientCa: ts.certs.ca,
      tessera,
    });
  }, 120_000);

  afterAll(async () => {
    await workflows?.close();
    await proxy?.close();
    await ts?.close();
  });

  it("admits each kind of credential with its principal and tenant, over Connect and gRPC", async () => {
    const expected: [string, string, string][] = [
      ["jwt", ids.user!, "jwt"],
      ["pat", ids.user!, "pat"],
      ["apiKey", ids.user!, "api_key"],
      ["machineToken", ids.machine!, "machine_token"],
      ["basic", ids.basicMachine!, "basic"],
    ];
    for (const [name, principal, kind] of expected) {
      const headers = name === "basic" ? { authorization: creds.basic! } : bearer(creds[name]!);
      for (const grpc of [false, true]) {
        const listed = await wf(headers, { grpc }).list();
        expect(listed.principalId, name).toBe(principal);
        expect(listed.tenantId, name).toBe(tenantId);
        expect(listed.workflows.map((w) => w.id)).toEqual(["wf-build", "wf-deploy"]);
      }
      if (name !== "pat" && name !== "basic")
        expect((await wf(headers).run()).credentialKind, name).toBe(kind);
    }
  });

  it("refuses without a credential, with a forged one, and for a scope the method's proto option requires", async () => {
    expect(await refusal(wf({}).list())).toMatchObject({
      code: Code.Unauthenticated,
      reason: "AUTH_REQUIRED",
    });
    expect(await refusal(wf(bearer("tsr_pat_nothing_of_the_sort")).list())).toMatchObject({
      code: Code.Unauthenticated,
    });
    const jwt = creds.jwt!;
    const mid = jwt.length - 20;
    const forged = `${jwt.slice(0, mid)}${jwt[mid] === "A" ? "B" : "A"}${jwt.slice(mid + 1)}`;
    expect(await refusal(wf(bearer(forged)).list())).toMatchObject({
      code: Code.Unauthenticated,
      reason: "TOKEN_INVALID",
    });
    // The PAT and the Basic machine hold workflows:read only: RunWorkflow needs workflows:run.
    for (const headers of [bearer(creds.pat!), { authorization: creds.basic! }])
      for (const grpc of [false, true])
        expect(await refusal(wf(headers, { grpc }).run())).toMatchObject({
          code: Code.PermissionDenied,
          reason: "ACCESS_DENIED",
        });
  });

  it("admits a certificate-bound token only on a connection with its certificate", async () => {
    expect((await wf(bearer(creds.boundJwt!), { clientCert: true }).list()).principalId).toBe(ids.bound);
    expect(await refusal(wf(bearer(creds.boundJwt!)).list())).toMatchObject({
      code: Code.Unauthenticated,
      reason: "TOKEN_NOT_BOUND",
    });
  });

  it("protects the JSON route with the Node middleware on the same core", async () => {
    const ok = await getJson(workflows.url, ts.certs.ca, `Bearer ${creds.pat}`);
    expect(ok.status).toBe(200);
    expect(ok.body.principal_id).toBe(ids.user);
    const none = await getJson(workflows.url, ts.certs.ca);
    expect(none.status).toBe(401);
    expect(none.body.reason).toBe("AUTH_REQUIRED");
    expect(none.headers["www-authenticate"]).toBe('Bearer realm="tessera"');
    const bad = await getJson(workflows.url, ts.certs.ca, "Bearer tsr_key_not_a_key_at_all");
    expect(bad.status).toBe(401);
  });

  it("refuses each credential on the next call once it is revoked on Tessera", async () => {
    const plain = ts.connect();
    const admin = clients(plain, root);
    const tokens = clientFor(TokenService, plain, creds.jwt);
    const revocations: [string, () => Promise<unknown>, string][] = [
      ["pat", () => tokens.revokePersonalAccessToken({ id: ids.pat! }), "TOKEN_REVOKED"],
      ["apiKey", () => tokens.revokeApiKey({ id: ids.apiKey! }), "TOKEN_REVOKED"],
      ["machineToken", () => admin.machines.rotateMachineUserCredentials({ id: ids.machine! }), ""],
      ["basic", () => admin.machines.rotateMachineUserCredentials({ id: ids.basicMachine! }), ""],
      [
        "jwt",
        () => createClient(UserService, plain).logout({ refreshToken: creds.refresh! }),
        "TOKEN_REVOKED",
      ],
    ];
    for (const [name, revoke, reason] of revocations) {
      const headers = name === "basic" ? { authorization: creds.basic! } : bearer(creds[name]!);
      await wf(headers).list(); // admitted (and, were there a cache, cached)
      await revoke();
      const refused = await refusal(wf(headers).list());
      expect(refused.code, name).toBe(Code.Unauthenticated);
      if (reason) expect(refused.reason, name).toBe(reason);
      expect((await getJson(workflows.url, ts.certs.ca, headers.authorization)).status, name).toBe(401);
    }
  });

  it("answers 503 with Retry-After while Tessera cannot be reached, and admits again once it can", async () => {
    const plain = ts.connect();
    const admin = clients(plain, root);
    const machine = await admin.machines.createMachineUser({
      tenantId,
      name: `late-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["workflows:read"],
    });
    const headers = bearer(machine.token);
    expect((await wf(headers).list()).principalId).toBe(machine.machineUser!.id);
    proxy.cut();
    try {
      for (const grpc of [false, true])
        expect(await refusal(wf(headers, { grpc }).list())).toMatchObject({
          code: Code.Unavailable,
          reason: "UNAVAILABLE",
          retryAfter: "1",
        });
      const json = await getJson(workflows.url, ts.certs.ca, headers.authorization);
      expect(json.status).toBe(503);
      expect(json.headers["retry-after"]).toBe("1");
    } finally {
      proxy.restore();
    }
    expect((await wf(headers).list()).principalId).toBe(machine.machineUser!.id);
  });
});
