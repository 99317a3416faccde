import { toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import {
  VerificationCode,
  VerificationService,
  VerifyCredentialResponseSchema,
} from "../gen/tessera/v1/verification_service_pb.js";
import { generateToken } from "../src/auth/token-format.js";
import { AuditEventRepository } from "../src/storage/repositories/audit.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";
import { type GrpcVerifier, grpcVerifier, grpcVerify, postText } from "./verification-fixtures.js";

/**
 * The tenant wall of VerifyCredential and /oauth2/introspect (issue 22: "a credential of
 * another tenant than the caller's answers exactly like one that does not exist, unless the
 * caller holds a cross-tenant scope"), against a real server over TLS, over Connect and an
 * independent gRPC client: every kind of credential in every state it can be in, verified
 * by a caller of another tenant, answers byte for byte what a credential that does not exist
 * answers, with the same audit record and without its secret being looked at; a `*` caller
 * hears the real code.
 */
const KINDS = ["userJwt", "pat", "apiKey", "machineToken", "machineJwt", "boundJwt", "basic"] as const;
type Kind = (typeof KINDS)[number];
type State =
  | "live"
  | "expired"
  | "revoked"
  | "disabledSubject"
  | "disabledTenant"
  | "insufficientScope"
  | "notAssigned";

const all = (code: string): Record<Kind, string> =>
  Object.fromEntries(KINDS.map((k) => [k, code])) as Record<Kind, string>;

/**
 * What a caller that sees every tenant hears. Machine tokens and Basic pairs do not expire:
 * their "expired" is a rotation's grace period that has run out (REVOKED), and a rotation
 * without one deletes them at once (NOT_FOUND, even for `*`). A disabled machine user's
 * Basic pair reads as a wrong password on purpose (NOT_FOUND, as Login).
 */
const REAL: Record<State, Record<Kind, string>> = {
  live: all("VALID"),
  insufficientScope: all("INSUFFICIENT_SCOPES"),
  notAssigned: all("NOT_ASSIGNED"),
  expired: { ...all("EXPIRED"), machineToken: "REVOKED", basic: "REVOKED" },
  revoked: { ...all("REVOKED"), machineToken: "NOT_FOUND", basic: "NOT_FOUND" },
  disabledSubject: { ...all("DISABLED"), basic: "NOT_FOUND" },
  disabledTenant: { ...all("TENANT_DISABLED"), basic: "NOT_FOUND" },
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.each(DATABASES)("the tenant wall of verification on $name", (db) => {
  let ts: TestServer;
  let plain: Transport;
  let root: string;
  let homeTenantId: string;
  let verifierId: string;
  let verifierToken: string;
  let superToken: string;
  let grpcClient: GrpcVerifier;
  let thumbprint: string;

  type ForeignSet = Awaited<ReturnType<typeof foreignSet>>;

  /** A tenant of its own holding one credential of each kind (`expiring`: PAT and API key expire in 1.5 s). */
  async function foreignSet(expiring = false) {
    const admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `wall-${short()}` });
    const tenantId = tenant!.id;
    const applicationId = (await admin.tenants.createApplication({ tenantId, name: "workflows" }))
      .application!.id;
    const username = `erin-${short()}`;
    const user = await admin.users.createUser({
      username,
      password: "erin password long",
      scopes: ["workflows:read"],
      tenantId,
    });
    const login = await createClient(UserService, plain).login({
      username,
      password: "erin password long",
      tenant: tenantId,
    });
    const tokens = clientFor(TokenService, plain, login.accessToken);
    const expiry = expiring ? { expiresAt: timestampFromMs(Date.now() + 1500) } : {};
    const pat = await tokens.createPersonalAccessToken({ name: "cli", ...expiry });
    const apiKey = await tokens.createApiKey({ name: "ci", ...expiry });
    const machine = await admin.machines.createMachineUser({
      tenantId,
      name: `worker-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["workflows:run"],
    });
    const machineId = machine.machineUser!.id;
    const machineJwt = (await clients(plain, machine.token).machines.issueAccessToken({})).accessToken;
    const bound = await ts.app.jwt.issue({
      subject: machineId,
      tenantId,
      scopes: ["workflows:run"],
      kind: "machine",
      certificateThumbprint: thumbprint,
    });
    const basicMachine = await admin.machines.createMachineUser({
      tenantId,
      name: `basic-${short()}`,
      authType: MachineAuthType.BASIC,
    });
    const creds: Record<Kind, string> = {
      userJwt: login.accessToken,
      pat: pat.token,
      apiKey: apiKey.key,
      machineToken: machine.token,
      machineJwt,
      boundJwt: bound.token,
      basic: `Basic ${Buffer.from(`${basicMachine.username}:${basicMachine.password}`).toString("base64")}`,
    };
    return {
      tenantId,
      applicationId,
      userId: user.user!.id,
      machineId,
      basicMachineId: basicMachine.machineUser!.id,
      refreshToken: login.refreshToken,
      patId: pat.id,
      apiKeyId: apiKey.id,
      userToken: login.accessToken,
      creds,
    };
  }

  /** The request fields a state is verified with. */
  function extraOf(state: State, set: ForeignSet): object {
    if (state === "insufficientScope")
      return { required_scopes: ["billing:write"], requiredScopes: ["billing:write"] };
    if (state === "notAssigned")
      return { application_id: set.applicationId, applicationId: set.applicationId };
    return {};
  }

  /** The answer over Connect (its bytes) and over gRPC, which must agree on the code. */
  async function answers(credential: string, extra: object, token: string) {
    const [c, g] = await Promise.all([
      clientFor(VerificationService, plain, token).verifyCredential({ credential, ...extra }),
      grpcVerify(grpcClient, credential, extra, token),
    ]);
    expect(g.code).toBe(VerificationCode[c.code]);
    return { bytes: Buffer.from(toBinary(VerifyCredentialResponseSchema, c)).toString("hex"), grpc: g, c };
  }

  async function introspect(token: string, as: string): Promise<string> {
    const res = await postText(ts, "/oauth2/introspect", new URLSearchParams({ token }).toString(), {
      authorization: `Bearer ${as}`,
    });
    expect(res.status).toBe(200);
    return res.text;
  }

  /**
   * Every credential of `set` in `state`: behind the wall exactly the answer of a credential
   * that does not exist (its secret never looked at), and the real code for a `*` caller.
   */
  async function expectWalled(state: State, set: ForeignSet): Promise<void> {
    const extra = extraOf(state, set);
    const missesBefore = ts.app.secrets.stats().misses;
    for (const kind of KINDS) {
      const unknown = await answers(generateToken("tsr_pat_").token, extra, verifierToken);
      const foreign = await answers(set.creds[kind], extra, verifierToken);
      expect(foreign.bytes, `${state} ${kind} over Connect`).toBe(unknown.bytes);
      expect(foreign.grpc, `${state} ${kind} over gRPC`).toEqual(unknown.grpc);
      expect(VerificationCode[foreign.c.code], `${state} ${kind}`).toBe("NOT_FOUND");
      expect(await introspect(set.creds[kind], verifierToken), `${state} ${kind} introspected`).toBe(
        '{"active":false}',
      );
    }
    // No foreign secret reached the verified-secret cache (a first use would be a miss).
    expect(ts.app.secrets.stats().misses, state).toBe(missesBefore);
    for (const kind of KINDS) {
      const real = await answers(set.creds[kind], extra, superToken);
      expect(VerificationCode[real.c.code], `${state} ${kind} for a * caller`).toBe(REAL[state][kind]);
    }
  }

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    plain = ts.connect();
    grpcClient = grpcVerifier(ts.server.port, ts.certs.ca);
    thumbprint = Buffer.from(ts.certs.clientFingerprint, "hex").toString("base64url");
    root = await adminLogin(plain);
    const admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `home-${short()}` });
    homeTenantId = tenant!.id;
    const verifier = await admin.machines.createMachineUser({
      tenantId: homeTenantId,
      name: `verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    verifierId = verifier.machineUser!.id;
    verifierToken = verifier.token;
    superToken = (
      await admin.machines.createMachineUser({
        name: `super-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["*"],
      })
    ).token;
    // Both callers' own tokens verified once (their first use is a miss of the secret cache).
    await answers(generateToken("tsr_pat_").token, {}, verifierToken);
    await answers(generateToken("tsr_pat_").token, {}, superToken);
  });
  afterAll(async () => {
    grpcClient?.close();
    await ts?.close();
  });

  it("answers another tenant's live credentials of every kind as unknown ones, and VALID to a * caller", async () => {
    const set = await foreignSet();
    await expectWalled("live", set);
    // Verified (and their secrets cached) by the * caller: still unknown behind the wall.
    await expectWalled("live", set);
    const active = JSON.parse(await introspect(set.creds.pat, superToken)) as { active: boolean };
    expect(active.active).toBe(true);
  });

  it("answers another tenant's credentials lacking the required scopes or the application as unknown ones", async () => {
    const set = await foreignSet();
    await expectWalled("insufficientScope", set);
    await expectWalled("notAssigned", set);
  });

  it("answers another tenant's expired credentials of every kind as unknown ones, not EXPIRED", async () => {
    const set = await foreignSet(true);
    const admin = clients(plain, root);
    // A machine token or Basic pair ends when a rotation's grace period does.
    for (const id of [set.machineId, set.basicMachineId])
      await admin.machines.rotateMachineUserCredentials({ id, gracePeriodSeconds: 1 });
    const expired = async (kind: "user" | "machine", subject: string, bound: boolean) =>
      (
        await ts.app.jwt.issue({
          subject,
          tenantId: set.tenantId,
          scopes: ["workflows:read"],
          kind,
          ttlSeconds: -60,
          ...(bound ? { certificateThumbprint: thumbprint } : {}),
        })
      ).token;
    set.creds.userJwt = await expired("user", set.userId, false);
    set.creds.machineJwt = await expired("machine", set.machineId, false);
    set.creds.boundJwt = await expired("machine", set.machineId, true);
    await sleep(1600);
    await expectWalled("expired", set);
  });

  it("answers another tenant's revoked credentials of every kind as unknown ones, not REVOKED", async () => {
    const set = await foreignSet();
    await createClient(UserService, plain).logout({ refreshToken: set.refreshToken });
    const tokens = clientFor(TokenService, plain, root);
    await tokens.revokePersonalAccessToken({ id: set.patId });
    await tokens.revokeApiKey({ id: set.apiKeyId });
    const admin = clients(plain, root);
    for (const id of [set.machineId, set.basicMachineId])
      await admin.machines.rotateMachineUserCredentials({ id });
    await expectWalled("revoked", set);
  });

  it("answers the credentials of another tenant's disabled user and machine users as unknown ones, not DISABLED", async () => {
    const set = await foreignSet();
    const admin = clients(plain, root);
    await admin.users.updateUser({ id: set.userId, disabled: true });
    for (const id of [set.machineId, set.basicMachineId])
      await admin.machines.updateMachineUser({ id, disabled: true });
    await expectWalled("disabledSubject", set);
  });

  it("answers the credentials of another, disabled tenant as unknown ones, not TENANT_DISABLED", async () => {
    const set = await foreignSet();
    await clients(plain, root).tenants.updateTenant({ id: set.tenantId, disabled: true });
    await expectWalled("disabledTenant", set);
  });

  it("audits every walled verification as an unknown credential's: NOT_FOUND, no target, the caller's tenant", async () => {
    await ts.app.audit.flush();
    const rows = await new AuditEventRepository(ts.app.sql).list(
      { action: "credential.verify", actorId: verifierId },
      2000,
    );
    // 7 kinds, 8 verifications each (a foreign one and an unknown one, Connect and gRPC, and introspection).
    expect(rows.length).toBeGreaterThan(7 * 7 * 4);
    for (const r of rows) {
      expect(r).toMatchObject({
        reason: "NOT_FOUND",
        outcome: "failure",
        targetId: null,
        tenantId: homeTenantId,
      });
    }
  });
});

describe.each(DATABASES)("the tenant wall with rate limits on ($name)", (db) => {
  let ts: TestServer;
  let verifierToken: string;
  let superToken: string;
  const foreign: Record<"jwt" | "expiredJwt" | "pat", string> = { jwt: "", expiredJwt: "", pat: "" };

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { enabled: true, authFailuresPerIpPerMinute: 4, perIpPerMinute: 10_000 },
    });
    const plain = ts.connect();
    const admin = clients(plain, await adminLogin(plain));
    const { tenant: home } = await admin.tenants.createTenant({ name: `home-${short()}` });
    const machine = (name: string, scopes: string[], tenantId?: string) =>
      admin.machines.createMachineUser({
        name: `${name}-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes,
        ...(tenantId ? { tenantId } : {}),
      });
    verifierToken = (await machine("verifier", ["auth:verify"], home!.id)).token;
    superToken = (await machine("super", ["*"])).token;
    const { tenant } = await admin.tenants.createTenant({ name: `far-${short()}` });
    const username = `frank-${short()}`;
    const user = await admin.users.createUser({
      username,
      password: "frank password long",
      tenantId: tenant!.id,
    });
    foreign.jwt = (
      await createClient(UserService, plain).login({
        username,
        password: "frank password long",
        tenant: tenant!.id,
      })
    ).accessToken;
    foreign.pat = (
      await clientFor(TokenService, plain, foreign.jwt).createPersonalAccessToken({ name: "f" })
    ).token;
    foreign.expiredJwt = (
      await ts.app.jwt.issue({
        subject: user.user!.id,
        tenantId: tenant!.id,
        scopes: [],
        kind: "user",
        ttlSeconds: -60,
      })
    ).token;
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("spends a point of the caller's failure budget for another tenant's credential as for an unknown one, then answers RATE_LIMITED alike", async () => {
    const as = (token: string) => clientFor(VerificationService, ts.connect(), token);
    const code = async (credential: string, token = verifierToken) =>
      VerificationCode[(await as(token).verifyCredential({ credential })).code];
    // The * caller (its own budget) hears the real codes, and caches the PAT's secret.
    expect(await code(foreign.pat, superToken)).toBe("VALID");
    expect(await code(foreign.jwt, superToken)).toBe("VALID");
    expect(await code(foreign.expiredJwt, superToken)).toBe("EXPIRED");
    const first = [
      await code(foreign.jwt),
      await code(foreign.expiredJwt),
      await code(foreign.pat),
      await code(generateToken("tsr_pat_").token),
    ];
    expect(first).toEqual(["NOT_FOUND", "NOT_FOUND", "NOT_FOUND", "NOT_FOUND"]);
    // Four failures spent the budget of four: each foreign credential counted as one.
    const limited = await as(verifierToken).verifyCredential({ credential: foreign.pat });
    const unknown = await as(verifierToken).verifyCredential({ credential: generateToken("tsr_pat_").token });
    expect(VerificationCode[limited.code]).toBe("RATE_LIMITED");
    expect({ ...limited, retryAfterSeconds: 0 }).toEqual({ ...unknown, retryAfterSeconds: 0 });
    for (const credential of [foreign.jwt, foreign.expiredJwt])
      expect(await code(credential)).toBe("RATE_LIMITED");
  });
});
