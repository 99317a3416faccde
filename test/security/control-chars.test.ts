import {
  create,
  type DescMessage,
  type DescMethod,
  type DescMethodUnary,
  type DescService,
  ScalarType,
} from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { PrincipalKind } from "../../gen/tessera/v1/options_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { authRuleFor } from "../../src/admission/auth-rule.js";
import { rejection } from "../errors-util.js";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, basic, bearerMachine, clients, short } from "../machine-fixtures.js";

/**
 * Control characters in every string field of every unary RPC, generated from the
 * descriptors: a NUL (which SQLite and PostgreSQL refuse in a query, formerly a 500 with
 * the SQL and its values in the log) and the other characters no field has a use for.
 * Each call is made as a principal the method admits (the `*` admin, or a machine user
 * for machine RPCs), so it reaches validation: the answer is InvalidArgument naming the
 * field, never Internal.
 */

/** One string field of a request type, reachable through nested messages and oneofs. */
interface StringPath {
  /** e.g. "scopes.scopes" for a nested message's field; oneof members by their own name. */
  name: string;
  /** Put `value` at this field of the request message `m` (replacing a oneof's case). */
  set(m: Record<string, unknown>, value: string): void;
}

function stringPaths(desc: DescMessage, depth = 0): StringPath[] {
  const out: StringPath[] = [];
  if (depth > 3) return out;
  for (const f of desc.fields) {
    const place = (m: Record<string, unknown>, value: unknown) => {
      if (f.oneof) m[f.oneof.localName] = { case: f.localName, value };
      else m[f.localName] = value;
    };
    if (f.fieldKind === "scalar" && f.scalar === ScalarType.STRING)
      out.push({ name: f.name, set: (m, v) => place(m, v) });
    else if (f.fieldKind === "list" && f.listKind === "scalar" && f.scalar === ScalarType.STRING)
      out.push({ name: f.name, set: (m, v) => place(m, [...((m[f.localName] as string[]) ?? []), v]) });
    else if (f.fieldKind === "message")
      for (const inner of stringPaths(f.message, depth + 1))
        out.push({
          name: `${f.name}.${inner.name}`,
          set: (m, v) => {
            const sub = (m[f.localName] as Record<string, unknown> | undefined) ?? create(f.message);
            inner.set(sub as Record<string, unknown>, v);
            place(m, sub);
          },
        });
    else if (f.fieldKind === "map" && f.mapKey === ScalarType.STRING)
      out.push({ name: f.name, set: (m, v) => place(m, { [v]: "" }) });
  }
  return out;
}

/** Whether a method is called by a machine user (it admits no human user). */
function machineOnly(method: DescMethod): boolean {
  const rule = authRuleFor(method);
  return !rule.public && !rule.principals.includes(PrincipalKind.USER);
}

const BAD = [
  ["NUL", "x\u0000y"],
  ["ESC", "x\u001by"],
  ["DEL", "x\u007fy"],
  ["C1 NEL", "x\u0085y"],
] as const;

describe.each(DATABASES)("control characters in request strings on $name", (db) => {
  let ts: TestServer;
  let adminToken: string;
  let machineToken: string;
  let services: DescService[];
  /** A valid request per method, so that the one bad field is what decides the answer. */
  let baseline: (method: string) => Record<string, unknown>;

  beforeAll(async () => {
    ts = await startTestServer(db);
    const grpc = ts.grpc();
    adminToken = await adminLogin(grpc);
    const root = clients(grpc, adminToken);
    const { tenant } = await root.tenants.createTenant({ name: `tenant-${short()}` });
    const { application } = await root.tenants.createApplication({ tenantId: tenant!.id, name: "app" });
    // auth:verify: VerifyCredential's caller (a machine principal holding it).
    const { machine, token } = await bearerMachine(grpc, adminToken, [application!.id], {
      tenantId: tenant!.id,
      scopes: ["auth:verify"],
    });
    machineToken = token;
    const { user } = await root.users.createUser({
      username: `u-${short()}`,
      password: "a user password of length",
      scopes: ["admin:users"],
      tenantId: tenant!.id,
    });
    const tenantId = tenant!.id;
    const appId = application!.id;
    const san = { case: "sanUri", value: "spiffe://example.org/backend" };
    const requests: Record<string, () => Record<string, unknown>> = {
      Login: () => ({ username: "admin", password: ADMIN_PASSWORD }),
      // A wrong current password: even a field that slipped through changes nothing.
      ChangePassword: () => ({
        currentPassword: "not the password at all",
        newPassword: "a new password here",
      }),
      CreateUser: () => ({
        username: `u-${short()}`,
        password: "a user password of length",
        scopes: [],
        tenantId,
      }),
      GetUser: () => ({ id: user!.id }),
      UpdateUser: () => ({ id: user!.id }),
      ListPersonalAccessTokens: () => ({ userId: user!.id }),
      ListApiKeys: () => ({ userId: user!.id }),
      CreatePersonalAccessToken: () => ({ name: `t-${short()}`, scopes: [] }),
      CreateApiKey: () => ({ name: `k-${short()}`, scopes: [] }),
      CreateTenant: () => ({ name: `tenant-${short()}` }),
      GetTenant: () => ({ id: tenantId }),
      UpdateTenant: () => ({ id: tenantId }),
      CreateApplication: () => ({ tenantId, name: `app-${short()}` }),
      GetApplication: () => ({ id: appId }),
      ListApplications: () => ({ tenantId }),
      CreateMachineUser: () => ({ tenantId, name: `mu-${short()}`, authType: MachineAuthType.BEARER }),
      GetMachineUser: () => ({ id: machine.id }),
      UpdateMachineUser: () => ({ id: machine.id }),
      ListMachineUsers: () => ({ tenantId }),
      BindCertificate: () => ({ machineUserId: machine.id, identity: san }),
      UnbindCertificate: () => ({ machineUserId: machine.id, identity: san }),
      RegisterBackend: () => ({
        callbackUrl: "https://backend.example.org/callback",
        version: "1.0.0",
        applicationId: appId,
      }),
      ListBackends: () => ({ tenantId }),
    };
    baseline = (method) => requests[method]?.() ?? {};
    services = [...ts.app.services, Health];
  });
  afterAll(async () => {
    await ts?.close();
  });

  /** Every unary method with each of its string fields, as cases. */
  function cases(): { method: DescMethodUnary; path: StringPath }[] {
    const out: { method: DescMethodUnary; path: StringPath }[] = [];
    for (const service of services)
      for (const method of service.methods)
        if (method.methodKind === "unary")
          for (const path of stringPaths(method.input)) out.push({ method: method as DescMethodUnary, path });
    return out;
  }

  /** The refusal of a call, or undefined when it was accepted. */
  async function call(
    transport: Transport,
    method: DescMethodUnary,
    input: unknown,
  ): Promise<ConnectError | undefined> {
    const token = machineOnly(method) ? machineToken : adminToken;
    const header = new Headers({ authorization: `Bearer ${token}` });
    try {
      await transport.unary(method, undefined, undefined, header, input as never);
      return undefined;
    } catch (err) {
      return ConnectError.from(err);
    }
  }

  it("covers every string field of every RPC, nested and oneof members included", () => {
    const names = cases().map((c) => `${c.method.name}.${c.path.name}`);
    // Spot checks that the generator reaches the fields of the findings.
    expect(names).toContain("Login.username");
    expect(names).toContain("RegisterBackend.version");
    expect(names).toContain("BindCertificate.san_uri");
    expect(names).toContain("UnbindCertificate.sha256_fingerprint");
    expect(names).toContain("CreateUser.scopes");
    expect(names.length).toBeGreaterThan(40);
  });

  it.each(BAD)(
    "answers InvalidArgument naming the field for %s in every string field, over gRPC and Connect",
    async (_label, bad) => {
      const transports = [ts.grpc(), ts.connect()];
      const wrong: string[] = [];
      for (const { method, path } of cases()) {
        for (const transport of transports) {
          const input = create(method.input, baseline(method.name) as never) as Record<string, unknown>;
          path.set(input, bad);
          const err = await call(transport, method, input);
          const field = err?.findDetails(ErrorInfoSchema)[0]?.metadata.field;
          if (err === undefined) wrong.push(`${method.name}.${path.name}: accepted`);
          else if (err.code !== Code.InvalidArgument || field !== path.name)
            wrong.push(`${method.name}.${path.name}: ${Code[err.code]} ${field} ${err.rawMessage}`);
        }
      }
      expect(wrong).toEqual([]);
    },
  );

  it("accepts printable Unicode, emoji (surrogate pairs) included, in a password", async () => {
    const root = clients(ts.connect(), adminToken);
    const username = `uni-${short()}`;
    const password = "pässwörd 🔑 with spaces and 漢字";
    await root.users.createUser({ username, password, scopes: [] });
    const login = await createClient(UserService, ts.grpc()).login({ username, password });
    expect(login.accessToken).not.toBe("");
  });

  it("refuses a string longer than any field may hold as InvalidArgument, before the database", async () => {
    const r = await rejection(
      createClient(UserService, ts.connect()).login({ username: "admin", password: "p".repeat(4097) }),
    );
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.error.findDetails(ErrorInfoSchema)[0]?.metadata.field).toBe("password");
  });

  it("still audits a refused call whose id holds a NUL or is over-long, without that id", async () => {
    // A NUL and an id over any field's length are refused by validation; one longer than
    // the column but within the bound is simply not found. Each call has its own request id.
    const ids = ["x\u0000y", "a".repeat(5000), "a".repeat(300)];
    const requestIds = ids.map((_, i) => `audit-${short()}-${i}`);
    for (const [i, id] of ids.entries()) {
      const root = clients(ts.connect(), {
        authorization: `Bearer ${adminToken}`,
        "x-request-id": requestIds[i]!,
      });
      expect((await rejection(root.users.deleteUser({ id }))).code).not.toBe(Code.Internal);
    }
    await ts.app.audit.flush();
    const rows = await ts.app.sql.all<{ target_id: string | null; reason: string }>(
      `select target_id, reason from audit_events where request_id in (?, ?, ?) and action = ?`,
      [...requestIds, "tessera.v1.UserService/DeleteUser"],
    );
    expect(rows.map((r) => [r.target_id, r.reason]).sort()).toEqual([
      [null, "INVALID_ARGUMENT"],
      [null, "INVALID_ARGUMENT"],
      [null, "NOT_FOUND"],
    ]);
  });

  it("refuses a NUL in a Login username before any database query, as the client's mistake", async () => {
    const r = await rejection(
      createClient(UserService, ts.connect()).login({
        username: "admin\u0000",
        password: "whatever password",
      }),
    );
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.reason).toBe("INVALID_ARGUMENT");
    expect(r.error.findDetails(ErrorInfoSchema)[0]?.metadata.field).toBe("username");
  });

  it("refuses a lone surrogate, which only a JSON escape can carry, as InvalidArgument", async () => {
    const agent = new Agent({ connect: { ca: ts.certs.ca } });
    try {
      const res = await undiciFetch(`${ts.server.url}/tessera.v1.UserService/Login`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: '{"username":"adm\\ud800in","password":"whatever password"}',
        dispatcher: agent,
      });
      expect(res.status).toBe(400);
      const body = (await res.json()) as { code: string; reason: string };
      expect(body.code).toBe("invalid_argument");
      expect(body.reason).toBe("INVALID_ARGUMENT");
    } finally {
      await agent.close();
    }
  });

  it("refuses Basic credentials holding a control character as a malformed header, not a fault", async () => {
    const r = await rejection(
      clients(ts.connect(), basic("admin\u0000", "whatever password")).users.getCurrentUser({}),
    );
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("AUTH_HEADER_MALFORMED");
  });
});
