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
import { createClientCertificate } from "../src/certs/dev-ca.js";
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
  /** The same service following WatchRevocations (its cache on), through a proxy of its own. */
  let watched: WorkflowServer;
  let watchProxy: DbProxy;
  let tenantId: string;
  let root: string;
  const creds: Record<string, string> = {};
  const ids: Record<string, string> = {};

  /** A workflows client over Connect (or gRPC) with headers, optionally presenting the test client certificate. */
  function wf(
    headers: Record<string, string>,
    opts: { grpc?: boolean; clientCert?: boolean; service?: WorkflowServer } = {},
  ) {
    const target = opts.service ?? workflows;
    const nodeOptions = {
      ca: ts.certs.ca,
      ...(opts.clientCert ? { cert: ts.certs.clientCert, key: ts.certs.clientKey } : {}),
    };
    const transport: Transport = opts.grpc
      ? createGrpcTransport({ baseUrl: target.url, nodeOptions })
      : createConnectTransport({ baseUrl: target.url, httpVersion: "2", nodeOptions });
    const client = createClient(WorkflowService, transport);
    return {
      list: () => client.listWorkflows({}, { headers }),
      run: () => client.runWorkflow({ workflowId: "wf-build" }, { headers }),
    };
  }

  beforeAll(async () => {
    // A heartbeat every second: a silent stream is found down within two.
    ts = await startTestServer(db, {
      server: { mtls: "optional" },
      verification: { watchHeartbeatSeconds: 1 },
    });
    proxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    watchProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
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
    watched = await startWorkflowServer({
      cert: readFileSync(join(ts.certs.dir, "server.crt")),
      key: readFileSync(join(ts.certs.dir, "server.key")),
      tessera: {
        ...tessera,
        server: `https://localhost:${watchProxy.port}`,
        watch: true,
        watchBackoffMs: { min: 50, max: 200 },
      },
    });
    expect(await watched.auth!.ready(10_000)).toBe(true);
  }, 120_000);

  afterAll(async () => {
    await workflows?.close();
    await watched?.close();
    await proxy?.close();
    await watchProxy?.close();
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

  it("authenticates to Tessera by a bound client certificate alone (mTLS), with no credential of its own", async () => {
    const plain = ts.connect();
    const admin = clients(plain, root);
    const dir = join(ts.certs.dir, "clients", `verifier-${db.name}`);
    const cert = await createClientCertificate(ts.certs.dir, `verifier-${db.name}`, dir);
    const verifier = await admin.machines.createMachineUser({
      tenantId,
      name: `mtls-verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    await admin.machines.bindCertificate({
      machineUserId: verifier.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: cert.sha256Fingerprint },
    });
    const mtls = await startWorkflowServer({
      cert: readFileSync(join(ts.certs.dir, "server.crt")),
      key: readFileSync(join(ts.certs.dir, "server.key")),
      // The folder holds client.crt and client.key: the SDK presents them, as its clients do.
      tessera: { server: ts.server.url, certFolder: dir, caFile: join(ts.certs.dir, "ca.crt") },
    });
    try {
      expect(await mtls.auth!.ready(10_000)).toBe(true);
      const machine = await admin.machines.createMachineUser({
        tenantId,
        name: `m-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["workflows:read"],
      });
      const headers = bearer(machine.token);
      expect((await wf(headers, { service: mtls }).list()).principalId).toBe(machine.machineUser!.id);
      expect(mtls.auth!.stats().cacheSize).toBe(1); // Tessera's answer, cached: the stream is up
      await admin.machines.deleteMachineUser({ id: machine.machineUser!.id });
      await expect.poll(() => mtls.auth!.stats().cacheSize, { timeout: 10_000 }).toBe(0);
      expect((await refusal(wf(headers, { service: mtls }).list())).code).toBe(Code.Unauthenticated);
    } finally {
      await mtls.close();
    }
  });

  describe("following WatchRevocations", () => {
    const w = (headers: Record<string, string>, grpc = false) => wf(headers, { service: watched, grpc });
    const stats = () => watched.auth!.stats();

    /** Fresh credentials of each kind, issued after the stream began (so a JWT is checked offline). */
    async function freshCredentials() {
      const plain = ts.connect();
      const admin = clients(plain, root);
      const username = `bob-${short()}`;
      const userId = (
        await admin.users.createUser({
          username,
          password: "bob password long",
          scopes: ["workflows:read"],
          tenantId,
        })
      ).user!.id;
      const login = await createClient(UserService, plain).login({
        username,
        password: "bob password long",
        tenant: tenantId,
      });
      const tokens = clientFor(TokenService, plain, login.accessToken);
      const pat = await tokens.createPersonalAccessToken({ name: "cli" });
      const key = await tokens.createApiKey({ name: "ci" });
      const machine = await admin.machines.createMachineUser({
        tenantId,
        name: `w-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["workflows:read"],
      });
      const basicMachine = await admin.machines.createMachineUser({
        tenantId,
        name: `wb-${short()}`,
        authType: MachineAuthType.BASIC,
        scopes: ["workflows:read"],
      });
      const b = `Basic ${Buffer.from(`${basicMachine.username}:${basicMachine.password}`).toString("base64")}`;
      return {
        userId,
        list: [
          ["pat", bearer(pat.token), () => tokens.revokePersonalAccessToken({ id: pat.id })],
          ["apiKey", bearer(key.key), () => tokens.revokeApiKey({ id: key.id })],
          [
            "machineToken",
            bearer(machine.token),
            () => admin.machines.rotateMachineUserCredentials({ id: machine.machineUser!.id }),
          ],
          [
            "basic",
            { authorization: b },
            () => admin.machines.rotateMachineUserCredentials({ id: basicMachine.machineUser!.id }),
          ],
          [
            "jwt",
            bearer(login.accessToken),
            () => createClient(UserService, plain).logout({ refreshToken: login.refreshToken }),
          ],
        ] as [string, Record<string, string>, () => Promise<unknown>][],
      };
    }

    it("serves credentials seen before without asking Tessera, and refuses each on the next call once its revocation arrives", async () => {
      expect(watched.auth!.watching()).toBe(true);
      await new Promise((r) => setTimeout(r, 1100)); // past the stream's start plus the 1 s skew
      const { list } = await freshCredentials();
      for (const [name, headers, revoke] of list) {
        await w(headers).list();
        const calls = stats().verifyCalls;
        for (const grpc of [false, true]) await w(headers, grpc).list();
        // The second and third calls: from the cache (or, for the JWT, offline).
        expect(stats().verifyCalls, name).toBe(calls);
        const events = stats().watch!.events;
        await revoke();
        await expect.poll(() => stats().watch!.events, { timeout: 10_000 }).toBeGreaterThan(events);
        expect((await refusal(w(headers).list())).code, name).toBe(Code.Unauthenticated);
      }
      expect(stats().offlineJwts).toBeGreaterThan(0);
      expect(stats().cacheHits).toBeGreaterThan(0);
    });

    it("does not serve a stale answer while the stream is cut, refuses with 503 meanwhile, and refuses the revoked credential once it is back", async () => {
      const { list } = await freshCredentials();
      const [, headers, revoke] = list[0]!; // the PAT
      await w(headers).list();
      expect(stats().cacheSize).toBeGreaterThan(0);
      watchProxy.cut();
      try {
        await expect.poll(() => watched.auth!.watching(), { timeout: 5000 }).toBe(false);
        expect(stats().cacheSize).toBe(0);
        await revoke(); // on Tessera directly: the downstream hears nothing of it now
        expect(await refusal(w(headers).list())).toMatchObject({ code: Code.Unavailable, retryAfter: "1" });
      } finally {
        watchProxy.restore();
      }
      expect(await watched.auth!.ready(10_000)).toBe(true);
      expect(await refusal(w(headers).list())).toMatchObject({
        code: Code.Unauthenticated,
        reason: "TOKEN_REVOKED",
      });
    });

    it("finds a silent stream down within twice its heartbeat: the cache is emptied and calls go to Tessera", async () => {
      const { list } = await freshCredentials();
      const [, headers, revoke] = list[1]!; // the API key
      await w(headers).list();
      expect(stats().cacheSize).toBeGreaterThan(0);
      const drops = stats().watch!.drops;
      watchProxy.freeze(); // bytes held, nothing answered, no reset: only the heartbeat tells
      try {
        await expect.poll(() => watched.auth!.watching(), { timeout: 5000, interval: 100 }).toBe(false);
        expect(stats().watch!.drops).toBe(drops + 1);
        expect(stats().cacheSize).toBe(0);
        await revoke();
        expect((await refusal(w(headers).list())).code).toBe(Code.Unavailable);
      } finally {
        watchProxy.restore();
      }
      expect(await watched.auth!.ready(10_000)).toBe(true);
      expect(await refusal(w(headers).list())).toMatchObject({
        code: Code.Unauthenticated,
        reason: "TOKEN_REVOKED",
      });
    });
  });
});
