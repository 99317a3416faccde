import http2 from "node:http2";
import type { DescMethod } from "@bufbuild/protobuf";
import { createClient, type Transport } from "@connectrpc/connect";
import { codeFromString } from "@connectrpc/connect/protocol-connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { MachineAuthType, MachineUserService } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TenantService } from "../gen/tessera/v1/tenant_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { admit } from "../src/admission/index.js";
import type { App } from "../src/app.js";
import type { RequestState } from "../src/context.js";
import { TesseraError } from "../src/errors.js";
import { Code, rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  createTestApp,
  DATABASES,
  memoryTransport,
  SQLITE,
  startTestServer,
  type TestServer,
  withHeaders,
} from "./helpers.js";

/** One raw HTTP/2 exchange: status, headers, trailers and body as text. */
interface RawResponse {
  status: number;
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
}

function rawCall(
  session: http2.ClientHttp2Session,
  path: string,
  headers: Record<string, string>,
  body: Uint8Array,
): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ":method": "POST", ":path": path, ...headers });
    const chunks: Buffer[] = [];
    let status = 0;
    let responseHeaders: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    stream.on("response", (h) => {
      status = Number(h[":status"]);
      responseHeaders = h;
    });
    stream.on("trailers", (t) => {
      trailers = t;
    });
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("end", () =>
      resolve({ status, headers: responseHeaders, trailers, body: Buffer.concat(chunks) }),
    );
    stream.on("error", reject);
    // The server may answer before it has read the body; the rest of it is then discarded.
    stream.end(body);
  });
}

/** A Connect JSON call to `path` whose body no parser accepts. */
function malformedJson(
  session: http2.ClientHttp2Session,
  path: string,
  headers: Record<string, string> = {},
) {
  return rawCall(session, path, { "content-type": "application/json", ...headers }, Buffer.from("{not json"));
}

/** A gRPC frame header promising more bytes than follow: malformed for any reader. */
const TRUNCATED_GRPC_FRAME = Uint8Array.of(0, 0, 0, 0, 100, 1, 2, 3);

/** The Connect code of an answer, as a number in a string: the Connect protocol's HTTP status and JSON body. */
function connectCode(res: RawResponse): string | undefined {
  const body = JSON.parse(res.body.toString("utf8")) as { code?: string };
  const code = body.code === undefined ? undefined : codeFromString(body.code);
  return code === undefined ? undefined : String(code);
}

/** The gRPC status of an answer (trailers, or headers for a trailers-only answer). */
function grpcCode(res: RawResponse): string | undefined {
  return (res.trailers["grpc-status"] ?? res.headers["grpc-status"]) as string | undefined;
}

/** The gRPC-Web status of an answer: in its trailer frame. */
function grpcWebCode(res: RawResponse): string | undefined {
  return /grpc-status:\s*(\d+)/.exec(res.body.toString("latin1"))?.[1];
}

describe("admission: refusals answered before the RPC pipeline", () => {
  let ts: TestServer;
  let session: http2.ClientHttp2Session;
  let adminToken: string;
  /** A user with no scope at all. */
  let plainToken: string;
  const GET_CURRENT_USER = "/tessera.v1.UserService/GetCurrentUser";
  const asAdmin = () => ({ authorization: `Bearer ${adminToken}` });

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    session = http2.connect(ts.server.url, { ca: ts.certs.ca });
    adminToken = (
      await createClient(UserService, ts.connect()).login({ username: "admin", password: ADMIN_PASSWORD })
    ).accessToken;
    const users = createClient(UserService, withHeaders(ts.connect(), asAdmin()));
    await users.createUser({ username: "plain", password: "plain user password", scopes: [] });
    plainToken = (
      await createClient(UserService, ts.connect()).login({
        username: "plain",
        password: "plain user password",
      })
    ).accessToken;
  });
  afterAll(async () => {
    session.close();
    await ts.close();
  });

  const credentials: [string, Record<string, string>][] = [
    ["a forged JWT", { authorization: "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl" }],
    ["an unknown token", { authorization: "Bearer not-a-tessera-token" }],
    ["an unknown Basic user", { authorization: `Basic ${Buffer.from("nobody:pw").toString("base64")}` }],
    ["a malformed Authorization header", { authorization: "Bearer" }],
    ["two credentials", { authorization: "Bearer x", "x-api-key": "y" }],
    ["no credential", {}],
  ];

  /** Transports over every protocol, and the in-process pipeline (no HTTP layer, so no admission) first. */
  function transports(): [string, Transport][] {
    const ca = ts.certs.ca;
    const baseUrl = ts.server.url;
    return [
      ["in-process pipeline", memoryTransport(ts.app)],
      ["Connect JSON", ts.connect()],
      [
        "Connect binary",
        createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true, nodeOptions: { ca } }),
      ],
      ["gRPC", ts.grpc()],
      ["gRPC-Web", createGrpcWebTransport({ baseUrl, httpVersion: "2", nodeOptions: { ca } })],
      ["gRPC over JSON", createGrpcTransport({ baseUrl, useBinaryFormat: false, nodeOptions: { ca } })],
    ];
  }

  /**
   * Make the same refused call over every transport; expect the same refusal everywhere
   * (code, reason, message, detail, WWW-Authenticate), each with its own request id.
   * @returns the pipeline's refusal
   */
  async function sameRefusalEverywhere(
    headers: Record<string, string>,
    call: (transport: Transport) => Promise<unknown>,
  ) {
    const seen = [];
    for (const [name, transport] of transports()) {
      const requestId = `admission-${name.replace(/[^a-z]/gi, "")}`;
      const r = await rejection(call(withHeaders(transport, { ...headers, "x-request-id": requestId })));
      seen.push({
        code: r.code,
        reason: r.reason,
        message: r.message,
        details: r.error.details.length,
        wwwAuthenticate: r.error.metadata.get("www-authenticate"),
      });
      // The in-process transport has no HTTP layer to take the request id from.
      if (name !== "in-process pipeline")
        expect(r.error.findDetails(ErrorInfoSchema)[0]?.metadata.request_id).toBe(requestId);
    }
    const [pipeline, ...answered] = seen;
    for (const a of answered) expect(a).toEqual(pipeline);
    return pipeline!;
  }

  it.each(credentials)(
    "refuses %s identically in every protocol, and as the pipeline does",
    async (_, headers) => {
      const refusal = await sameRefusalEverywhere(headers, (t) =>
        createClient(UserService, t).getCurrentUser({}),
      );
      expect([Code.Unauthenticated, Code.InvalidArgument]).toContain(refusal.code);
    },
  );

  it("refuses a principal without the method's scope identically in every protocol, and as the pipeline does", async () => {
    const refusal = await sameRefusalEverywhere({ authorization: `Bearer ${plainToken}` }, (t) =>
      createClient(TenantService, t).listTenants({}),
    );
    expect(refusal).toMatchObject({ code: Code.PermissionDenied, reason: "ACCESS_DENIED" });
    expect(refusal.wwwAuthenticate).toContain('scope="admin:tenants"');
    // Before the body: a malformed one is not what it is refused for.
    const raw = await malformedJson(session, "/tessera.v1.TenantService/ListTenants", {
      authorization: `Bearer ${plainToken}`,
    });
    expect(raw.status).toBe(403);
    expect(JSON.parse(raw.body.toString("utf8"))).toMatchObject({ reason: "ACCESS_DENIED", ok: false });
    const admin = await malformedJson(session, "/tessera.v1.TenantService/ListTenants", asAdmin());
    expect(admin.status).toBe(400);
  });

  it("refuses a caller before reading its request body, in every protocol", async () => {
    const bad = { authorization: "Bearer not-a-tessera-token" };
    // Control: with a valid token the same bodies are read, and refused as malformed.
    const parsedJson = await malformedJson(session, GET_CURRENT_USER, asAdmin());
    expect(parsedJson.status).toBe(400);
    const parsedGrpc = await rawCall(
      session,
      GET_CURRENT_USER,
      { "content-type": "application/grpc", te: "trailers", ...asAdmin() },
      TRUNCATED_GRPC_FRAME,
    );
    expect(parsedGrpc.trailers["grpc-status"]).toBe(String(Code.InvalidArgument));

    const json = await malformedJson(session, GET_CURRENT_USER, { "x-request-id": "early-json", ...bad });
    expect(json.status).toBe(401);
    expect(json.headers["content-type"]).toBe("application/json");
    expect(json.headers["x-request-id"]).toBe("early-json");
    expect(json.headers["x-content-type-options"]).toBe("nosniff");
    expect(json.headers["www-authenticate"]).toMatch(/^Bearer realm="tessera", error="invalid_token"/);
    expect(Number(json.headers["content-length"])).toBe(json.body.byteLength);
    const body = JSON.parse(json.body.toString("utf8")) as Record<string, unknown>;
    expect(body).toMatchObject({
      ok: false,
      error: "Unauthorized",
      reason: "TOKEN_INVALID",
      code: "unauthenticated",
      request_id: "early-json",
    });
    expect((body.details as { type: string }[])[0]?.type).toBe("google.rpc.ErrorInfo");

    const grpc = await rawCall(
      session,
      GET_CURRENT_USER,
      { "content-type": "application/grpc+proto", te: "trailers", ...bad },
      TRUNCATED_GRPC_FRAME,
    );
    expect(grpc.status).toBe(200);
    expect(grpc.headers["content-type"]).toBe("application/grpc+proto");
    expect(grpc.body.byteLength).toBe(0);
    expect(grpc.trailers["grpc-status"]).toBe(String(Code.Unauthenticated));
    expect(grpc.trailers["grpc-status-details-bin"]).toBeTruthy();
    expect(grpc.trailers["www-authenticate"]).toMatch(/error="invalid_token"/);

    const web = await rawCall(
      session,
      GET_CURRENT_USER,
      { "content-type": "application/grpc-web+proto", ...bad },
      TRUNCATED_GRPC_FRAME,
    );
    expect(web.status).toBe(200);
    expect(web.headers["content-type"]).toBe("application/grpc-web+proto");
    // One trailer frame: flag 0x80, then the length of the trailer block that follows.
    expect(web.body[0]).toBe(0x80);
    expect(web.body.readUInt32BE(1)).toBe(web.body.byteLength - 5);
    expect(web.body.subarray(5).toString("utf8")).toContain(`grpc-status: ${Code.Unauthenticated}\r\n`);
  });

  it("discards the unread body of a refused call and keeps the connection usable", async () => {
    const big = Buffer.alloc(3 * 1024 * 1024, 0x20);
    const refused = await rawCall(
      session,
      GET_CURRENT_USER,
      { "content-type": "application/json", authorization: "Bearer not-a-tessera-token" },
      big,
    );
    expect(refused.status).toBe(401);
    const next = await rawCall(
      session,
      GET_CURRENT_USER,
      { "content-type": "application/json", ...asAdmin() },
      Buffer.from("{}"),
    );
    expect(next.status).toBe(200);
    expect(JSON.parse(next.body.toString("utf8")).username).toBe("admin");
  });

  it("leaves refusals of audited calls to the pipeline, so the audit log records them with their target", async () => {
    const tokens = createClient(
      TokenService,
      withHeaders(ts.connect(), { authorization: "Bearer not-a-tessera-token" }),
    );
    const r = await rejection(tokens.revokePersonalAccessToken({ id: "target-of-a-refused-call" }));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("TOKEN_INVALID");
    await ts.app.audit.flush();
    const rows = await ts.app.sql.all<Record<string, unknown>>(
      "select action, outcome, reason, actor_kind from audit_events where target_id = ?",
      ["target-of-a-refused-call"],
    );
    expect(rows).toEqual([
      {
        action: "tessera.v1.TokenService/RevokePersonalAccessToken",
        outcome: "failure",
        reason: "TOKEN_INVALID",
        actor_kind: "anonymous",
      },
    ]);
  });

  it("authenticates an audited call whose body does not parse before answering it, and audits the answer", async () => {
    const REVOKE = "/tessera.v1.TokenService/RevokePersonalAccessToken";
    const LOGIN = "/tessera.v1.UserService/Login";
    const CREATE_TENANT = "/tessera.v1.TenantService/CreateTenant";
    const bodies: [string, Record<string, string>, Uint8Array, (r: RawResponse) => string | undefined][] = [
      ["Connect JSON", { "content-type": "application/json" }, Buffer.from("{not json"), connectCode],
      [
        "Connect binary",
        { "content-type": "application/proto" },
        Uint8Array.of(0x0a, 0x05, 0x61),
        connectCode,
      ],
      ["gRPC", { "content-type": "application/grpc", te: "trailers" }, TRUNCATED_GRPC_FRAME, grpcCode],
      ["gRPC-Web", { "content-type": "application/grpc-web+proto" }, TRUNCATED_GRPC_FRAME, grpcWebCode],
    ];
    const callers: [string, string, Record<string, string>, Code, string, string][] = [
      // path, credential, the answer's code and reason, the audit record's actor
      [
        REVOKE,
        "a bad token",
        { authorization: "Bearer not-a-tessera-token" },
        Code.Unauthenticated,
        "TOKEN_INVALID",
        "anonymous",
      ],
      [REVOKE, "no credential", {}, Code.Unauthenticated, "AUTH_REQUIRED", "anonymous"],
      [
        CREATE_TENANT,
        "a user without the scope",
        { authorization: `Bearer ${plainToken}` },
        Code.PermissionDenied,
        "ACCESS_DENIED",
        "user",
      ],
      // Authenticated and authorized: the body's own error, audited too.
      [REVOKE, "the admin", asAdmin(), Code.InvalidArgument, "INVALID_ARGUMENT", "user"],
      // A public audited method: nothing to authenticate; the malformed call is audited.
      [LOGIN, "no credential", {}, Code.InvalidArgument, "INVALID_ARGUMENT", "anonymous"],
    ];
    let n = 0;
    const expected: Record<string, unknown>[] = [];
    for (const [path, who, credential, code, reason, actor] of callers) {
      for (const [protocol, headers, body, codeOf] of bodies) {
        const requestId = `malformed-audited-${n++}`;
        const res = await rawCall(
          session,
          path,
          { ...headers, ...credential, "x-request-id": requestId },
          body,
        );
        expect([who, protocol, codeOf(res)], `${path} by ${who} over ${protocol}`).toEqual([
          who,
          protocol,
          String(code),
        ]);
        expected.push({
          request_id: requestId,
          reason,
          actor_kind: actor,
          target_id: null,
          outcome: "failure",
        });
      }
    }
    await ts.app.audit.flush();
    const rows = await ts.app.sql.all<Record<string, unknown>>(
      "select request_id, reason, actor_kind, target_id, outcome from audit_events where request_id like ? order by request_id",
      ["malformed-audited-%"],
    );
    const byId = (a: Record<string, unknown>, b: Record<string, unknown>) =>
      String(a.request_id).localeCompare(String(b.request_id));
    expect(rows.sort(byId)).toEqual(expected.sort(byId));
  });
});

describe.each(DATABASES)("admission through the in-memory router transport ($name)", (db) => {
  let app: App;
  beforeAll(async () => {
    app = await createTestApp(db, { rateLimit: { enabled: true, perPrincipalPerMinute: 2 } });
  });
  afterAll(async () => {
    await app?.close();
  });

  it("audits a refused call of an audited method with its target, and a refused read not at all", async () => {
    const forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    const revoke = await rejection(
      clientFor(TokenService, memoryTransport(app), forged).revokeApiKey({ id: "memory-target" }),
    );
    expect(revoke.reason).toBe("TOKEN_INVALID");
    const read = await rejection(clientFor(UserService, memoryTransport(app), forged).getCurrentUser({}));
    expect(read.reason).toBe("TOKEN_INVALID");
    await app.audit.flush();
    const rows = await app.sql.all<Record<string, unknown>>(
      "select action, target_id, outcome, reason, actor_kind from audit_events where reason = ?",
      ["TOKEN_INVALID"],
    );
    expect(rows).toEqual([
      {
        action: "tessera.v1.TokenService/RevokeApiKey",
        target_id: "memory-target",
        outcome: "failure",
        reason: "TOKEN_INVALID",
        actor_kind: "anonymous",
      },
    ]);
  });

  it("counts an admitted call once against the per-principal limit", async () => {
    const token = (
      await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const users = clientFor(UserService, memoryTransport(app), token);
    // Two a minute: counted twice per call, the second would be refused.
    expect((await users.getCurrentUser({})).username).toBe("admin");
    expect((await users.getCurrentUser({})).username).toBe("admin");
    expect((await rejection(users.getCurrentUser({}))).reason).toBe("RATE_LIMITED");
  });
});

describe("admission: the per-IP limit", () => {
  it("counts an audited call once, though its authentication waits for its body", async () => {
    // Counted before the body (server.ts), authenticated in the pipeline (the admission
    // interceptor): counted there again, the second call would be refused.
    const ts = await startTestServer(SQLITE, {
      rateLimit: { enabled: true, perIpPerMinute: 3 },
      admin: { token: "a-static-admin-token-of-32-characters" },
    });
    try {
      const tokens = createClient(
        TokenService,
        withHeaders(ts.connect(), { authorization: "Bearer a-static-admin-token-of-32-characters" }),
      );
      for (const id of ["first", "second", "third"]) {
        const r = await rejection(tokens.revokePersonalAccessToken({ id }));
        expect(r.reason).not.toBe("RATE_LIMITED");
      }
      const over = await rejection(tokens.revokePersonalAccessToken({ id: "fourth" }));
      expect(over.reason).toBe("RATE_LIMITED");
      await ts.app.audit.flush();
      const rows = await ts.app.sql.all<{ target_id: string; actor_kind: string }>(
        "select target_id, actor_kind from audit_events where action = ? order by target_id",
        ["tessera.v1.TokenService/RevokePersonalAccessToken"],
      );
      // Admitted (and failed in the handler) three times; the fourth was refused by the
      // per-IP limit, which is never audited.
      expect(rows).toEqual([
        { target_id: "first", actor_kind: "admin" },
        { target_id: "second", actor_kind: "admin" },
        { target_id: "third", actor_kind: "admin" },
      ]);
    } finally {
      await ts.close();
    }
  });

  it("refuses over the limit before reading the body, on public and audited methods alike", async () => {
    const ts = await startTestServer(SQLITE, { rateLimit: { enabled: true, perIpPerMinute: 1 } });
    const session = http2.connect(ts.server.url, { ca: ts.certs.ca });
    try {
      const login = "/tessera.v1.UserService/Login";
      const first = await malformedJson(session, login);
      expect(first.status).toBe(400);
      const limited = await malformedJson(session, login);
      expect(limited.status).toBe(429);
      expect(Number(limited.headers["retry-after"])).toBeGreaterThan(0);
      expect(limited.headers["x-ratelimit-remaining"]).toBe("0");
      expect(JSON.parse(limited.body.toString("utf8"))).toMatchObject({ reason: "RATE_LIMITED", ok: false });
      const grpc = await rawCall(
        session,
        login,
        { "content-type": "application/grpc", te: "trailers" },
        TRUNCATED_GRPC_FRAME,
      );
      expect(grpc.trailers["grpc-status"]).toBe(String(Code.ResourceExhausted));
      expect(Number(grpc.trailers["retry-after"])).toBeGreaterThan(0);
      // Refused by the limit: not audited (a flood must not become a flood of writes). The
      // malformed first call got past the limit: audited as failed (admitFailedCall).
      await ts.app.audit.flush();
      const rows = await ts.app.sql.all<Record<string, unknown>>(
        "select outcome, reason from audit_events where action = ?",
        ["tessera.v1.UserService/Login"],
      );
      expect(rows).toEqual([{ outcome: "failure", reason: "INVALID_ARGUMENT" }]);
    } finally {
      session.close();
      await ts.close();
    }
  });
});

/** A request state as the HTTP layer makes one (server.ts), for calling `admit` directly. */
function freshState(): RequestState {
  return { requestId: "test-request", ip: "127.0.0.1", certificate: null, principal: null };
}

describe.each(DATABASES)("admission decided synchronously when nothing needs I/O ($name)", (db) => {
  let app: App;
  let adminToken: string;
  let plain: { id: string; token: string };
  const getCurrentUser = UserService.method.getCurrentUser;
  const createTenant = TenantService.method.createTenant;
  /** `pending`: admission's promise, undefined when it decided synchronously; `result`: its verdict (undefined: admitted). */
  const admitWith = (method: DescMethod, authorization: string, state = freshState()) => {
    const result = admit(
      app,
      method,
      { get: (name) => (name === "authorization" ? authorization : null) },
      state,
      {},
    );
    return { pending: result instanceof Promise ? result : undefined, result, state };
  };

  beforeAll(async () => {
    app = await createTestApp(db);
    adminToken = (
      await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const created = await clientFor(UserService, memoryTransport(app), adminToken).createUser({
      username: "plain",
      password: "plain user password",
      scopes: [],
    });
    const token = (
      await clientFor(UserService, memoryTransport(app)).login({
        username: "plain",
        password: "plain user password",
      })
    ).accessToken;
    plain = { id: created.user!.id, token };
  });
  afterAll(async () => {
    await app.close();
  });

  it("admits a token verified before at once, on SQLite and on PostgreSQL (its state cache online), with the same outcome", async () => {
    const token = (
      await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    // First use of the token: its signature is verified, asynchronously.
    const first = admitWith(getCurrentUser, `Bearer ${token}`);
    expect(first.pending).toBeInstanceOf(Promise);
    await first.pending;
    expect(await first.result).toBeUndefined();
    expect(first.state.admission).toBe("admitted");
    const again = admitWith(getCurrentUser, `Bearer ${token}`);
    expect(again.pending).toBeUndefined();
    expect(await again.result).toBeUndefined();
    expect(again.state.admission).toBe("admitted");
    expect(again.state.principal).toMatchObject({ kind: "user", username: "admin", method: "jwt" });
    expect(again.state.user?.username).toBe("admin");
  });

  it("asks the static admin token's verifier once for a token another verifier decides", async () => {
    const withAdminToken = await createTestApp(db, {
      admin: { token: "a-static-admin-token-of-32-characters" },
    });
    try {
      const jwt = (
        await clientFor(UserService, memoryTransport(withAdminToken)).login({
          username: "admin",
          password: ADMIN_PASSWORD,
        })
      ).accessToken;
      const pat = (
        await clientFor(TokenService, memoryTransport(withAdminToken), jwt).createPersonalAccessToken({
          name: "once",
        })
      ).token;
      const adminVerifier = withAdminToken.authenticator.bearer[0]!;
      expect(adminVerifier.name).toBe("admin-token");
      const asked = vi.spyOn(adminVerifier, "verify");
      const state = freshState();
      const verdict = await admit(
        withAdminToken,
        getCurrentUser,
        { get: (name) => (name === "authorization" ? `Bearer ${pat}` : null) },
        state,
        {},
      );
      expect(verdict).toBeUndefined();
      expect(state.admission).toBe("admitted");
      expect(state.principal).toMatchObject({ kind: "user", username: "admin", method: "pat" });
      expect(asked).toHaveBeenCalledTimes(1);
    } finally {
      await withAdminToken.close();
    }
  });

  it("refuses a token of an ended session as the asynchronous path does, and at once on SQLite", async () => {
    const login = await clientFor(UserService, memoryTransport(app)).login({
      username: "plain",
      password: "plain user password",
    });
    await admitWith(getCurrentUser, `Bearer ${login.accessToken}`).pending;
    const admitted = admitWith(getCurrentUser, `Bearer ${login.accessToken}`);
    if (db.name === "sqlite") expect(admitted.pending).toBeUndefined();
    await admitted.pending;
    expect(admitted.state.principal?.id).toBe(plain.id);
    await clientFor(UserService, memoryTransport(app)).logout({ refreshToken: login.refreshToken });
    const ended = admitWith(getCurrentUser, `Bearer ${login.accessToken}`);
    if (db.name === "sqlite") expect(ended.pending).toBeUndefined();
    await ended.pending;
    const refused = await ended.result;
    expect(refused).toBeInstanceOf(TesseraError);
    expect((refused as TesseraError).reason).toBe("TOKEN_REVOKED");
    expect(ended.state.principal).toBeNull();
  });

  it("refuses as the asynchronous path does: missing scopes, a disabled user, an expired token", async () => {
    await admitWith(getCurrentUser, `Bearer ${plain.token}`).pending;
    const denied = admitWith(createTenant, `Bearer ${plain.token}`);
    if (db.name === "sqlite") expect(denied.pending).toBeUndefined();
    await denied.pending;
    const refusal = (await denied.result) as TesseraError;
    expect(refusal).toBeInstanceOf(TesseraError);
    expect(refusal.reason).toBe("ACCESS_DENIED");
    expect(refusal.metadata).toEqual({ required_scopes: "admin:tenants" });
    expect(refusal.headers?.["www-authenticate"]).toContain('scope="admin:tenants"');

    const admin = clientFor(UserService, memoryTransport(app), adminToken);
    await admin.updateUser({ id: plain.id, disabled: true });
    try {
      const disabled = admitWith(getCurrentUser, `Bearer ${plain.token}`);
      if (db.name === "sqlite") expect(disabled.pending).toBeUndefined();
      await disabled.pending;
      expect(((await disabled.result) as TesseraError).reason).toBe("PRINCIPAL_DISABLED");
      expect(disabled.state.principal).toBeNull();
    } finally {
      await admin.updateUser({ id: plain.id, disabled: false });
    }

    // A token past its expiry while its claims are still in memory.
    const now = Date.now;
    Date.now = () => now() + 3 * 3600_000;
    try {
      const expired = admitWith(getCurrentUser, `Bearer ${adminToken}`);
      if (db.name === "sqlite") expect(expired.pending).toBeUndefined();
      await expired.pending;
      expect(((await expired.result) as TesseraError).reason).toBe("TOKEN_EXPIRED");
    } finally {
      Date.now = now;
    }
  });
});

describe.each(DATABASES)("opaque tokens verified before ($name)", (db) => {
  let limited: App;
  let unlimited: App;
  const tokens = new Map<App, { pat: string; machine: string }>();
  const getCurrentUser = UserService.method.getCurrentUser;
  const checkAuthentication = MachineUserService.method.checkAuthentication;

  async function seed(app: App) {
    const admin = (
      await clientFor(UserService, memoryTransport(app)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const pat = (
      await clientFor(TokenService, memoryTransport(app), admin).createPersonalAccessToken({ name: "known" })
    ).token;
    const machine = (
      await clientFor(MachineUserService, memoryTransport(app), admin).createMachineUser({
        name: "known-machine",
        authType: MachineAuthType.BEARER,
      })
    ).token;
    tokens.set(app, { pat, machine });
  }

  beforeAll(async () => {
    limited = await createTestApp(db, { rateLimit: { enabled: true } });
    unlimited = await createTestApp(db);
    await seed(limited);
    await seed(unlimited);
  });
  afterAll(async () => {
    await limited?.close();
    await unlimited?.close();
  });

  /**
   * Admit `token` with `app`, recording for each call of its verifier's `verify` whether
   * hashing was refused there (`RequestState.hashingRefused`, set by src/admission/authenticate.ts).
   */
  async function admitRecording(app: App, verifierName: string, method: DescMethod, token: string) {
    const verifier = app.authenticator.bearer.find((v) => v.name === verifierName)!;
    const scoped: boolean[] = [];
    /** Per call of `verify`: whether it answered (or refused) without a promise (its row in the state cache). */
    const answeredNow: boolean[] = [];
    const original = verifier.verify.bind(verifier);
    const spy = vi.spyOn(verifier, "verify").mockImplementation((t, s) => {
      scoped.push(s.hashingRefused !== undefined);
      let answer: ReturnType<typeof original>;
      try {
        answer = original(t, s);
      } catch (refusal) {
        answeredNow.push(true);
        throw refusal;
      }
      answeredNow.push(!(answer instanceof Promise));
      return answer;
    });
    const state = freshState();
    try {
      const pending = admit(
        app,
        method,
        { get: (name) => (name === "authorization" ? `Bearer ${token}` : null) },
        state,
        {},
      );
      const synchronous = !(pending instanceof Promise);
      const result = await pending;
      return { state, scoped, answeredNow, synchronous, result };
    } finally {
      spy.mockRestore();
    }
  }

  const kinds = [
    {
      kind: "personal access token",
      verifier: "api-token",
      rule: () => getCurrentUser,
      method: "pat",
      of: "pat",
    },
    {
      kind: "machine token",
      verifier: "machine-token",
      rule: () => checkAuthentication,
      method: "machine_token",
      of: "machine",
    },
  ] as const;

  it.each(kinds)(
    "with rate limits on, decides a $kind verified before with hashing refused, from the state cache",
    async ({ verifier, rule, method, of }) => {
      const token = tokens.get(limited)![of];
      const first = await admitRecording(limited, verifier, rule(), token);
      expect(await first.result).toBeUndefined();
      expect(first.state.admission).toBe("admitted");
      expect(first.state.principal).toMatchObject({ method });
      // First use: tried with hashing refused, then verified with PBKDF2 once its budget is reserved.
      expect(first.scoped).toContain(true);
      expect(first.scoped.at(-1)).toBe(false);

      const again = await admitRecording(limited, verifier, rule(), token);
      expect(await again.result).toBeUndefined();
      expect(again.state.admission).toBe("admitted");
      expect(again.state.principal).toMatchObject({ method });
      // One attempt, with hashing refused (it needed none), answered without a promise: the
      // row from the state cache (SQLite's, or PostgreSQL's with its listener online).
      expect(again.scoped).toEqual([true]);
      expect(again.answeredNow).toEqual([true]);
    },
  );

  it.each(kinds)(
    "with rate limits off, admits a $kind verified before at once, from the state cache",
    async ({ verifier, rule, method, of }) => {
      const token = tokens.get(unlimited)![of];
      await admitRecording(unlimited, verifier, rule(), token);
      const again = await admitRecording(unlimited, verifier, rule(), token);
      expect(await again.result).toBeUndefined();
      expect(again.state.admission).toBe("admitted");
      expect(again.state.principal).toMatchObject({ method });
      expect(again.synchronous).toBe(true);
      expect(again.scoped).toEqual([false]);
      expect(again.answeredNow).toEqual([true]);
    },
  );

  it("with rate limits on, decides a JWT verified before without its asynchronous verification", async () => {
    const jwt = (
      await clientFor(UserService, memoryTransport(limited)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const first = await admitRecording(limited, "jwt", getCurrentUser, jwt);
    expect(await first.result).toBeUndefined();
    expect(first.state.admission).toBe("admitted");
    expect(first.scoped).toEqual([false]);
    const again = await admitRecording(limited, "jwt", getCurrentUser, jwt);
    expect(await again.result).toBeUndefined();
    expect(again.state.admission).toBe("admitted");
    expect(again.state.principal).toMatchObject({ kind: "user", username: "admin", method: "jwt" });
    // On PostgreSQL too: the user and session rows are in its state cache (pg-state.ts).
    expect(again.scoped).toEqual([false]);
    expect(again.answeredNow).toEqual([true]);
    // Both limits counted in memory without a promise: the whole admission was synchronous,
    // and the answer keeps a limit's headers, this call counted.
    expect(again.synchronous).toBe(true);
    const limit = again.state.rateLimit!;
    const { perIpPerMinute, perPrincipalPerMinute } = limited.config.rateLimit;
    expect([perIpPerMinute, perPrincipalPerMinute]).toContain(limit.limit);
    expect(limit.remaining).toBeLessThan(limit.limit);
    // Refusals too: a token of an ended session, decided at once and counted as a failure.
    const login = await clientFor(UserService, memoryTransport(limited)).login({
      username: "admin",
      password: ADMIN_PASSWORD,
    });
    await admitRecording(limited, "jwt", getCurrentUser, login.accessToken);
    await clientFor(UserService, memoryTransport(limited)).logout({ refreshToken: login.refreshToken });
    const ended = await admitRecording(limited, "jwt", getCurrentUser, login.accessToken);
    expect(((await ended.result) as TesseraError).reason).toBe("TOKEN_REVOKED");
    expect(ended.scoped).toEqual([false]);
    // The cache was emptied by the logout: SQLite's driver reads the row now, PostgreSQL awaits it.
    expect(ended.answeredNow).toEqual([db.name === "sqlite"]);
  });

  it("refuses a revoked personal access token verified before, at once on SQLite, as the asynchronous path does", async () => {
    const admin = (
      await clientFor(UserService, memoryTransport(limited)).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    const created = await clientFor(TokenService, memoryTransport(limited), admin).createPersonalAccessToken({
      name: "to revoke",
    });
    await admitRecording(limited, "api-token", getCurrentUser, created.token);
    await clientFor(TokenService, memoryTransport(limited), admin).revokePersonalAccessToken({
      id: created.id,
    });
    const revoked = await admitRecording(limited, "api-token", getCurrentUser, created.token);
    expect(((await revoked.result) as TesseraError).reason).toBe("TOKEN_REVOKED");
    expect(revoked.state.principal).toBeNull();
    expect(revoked.scoped).toEqual([true]);
    if (db.name === "sqlite") expect(revoked.answeredNow).toEqual([true]);
  });

  it.each([
    { limits: "on", app: () => limited },
    { limits: "off", app: () => unlimited },
  ])(
    "answers a verifier's synchronous throw with the same refusal as its rejection (rate limits $limits)",
    async ({ app: appOf }) => {
      const app = appOf();
      const verifier = app.authenticator.bearer.find((v) => v.name === "api-token")!;
      const refusal = new TesseraError("TOKEN_REVOKED", "token was revoked");
      const failures = [
        () => {
          throw refusal;
        },
        () => Promise.reject(refusal),
      ];
      const outcomes: unknown[] = [];
      for (const [i, fail] of failures.entries()) {
        const spy = vi.spyOn(verifier, "verify").mockImplementation(fail);
        // An address of its own per attempt: each spends the same budget from the same start.
        const state = { ...freshState(), ip: `192.0.2.${i + 1}` };
        try {
          const verdict = admit(
            app,
            getCurrentUser,
            { get: (name) => (name === "authorization" ? `Bearer ${tokens.get(app)!.pat}` : null) },
            state,
            {},
          );
          outcomes.push({ verdict: await verdict, admission: state.admission, principal: state.principal });
        } finally {
          spy.mockRestore();
        }
      }
      expect(outcomes[0]).toEqual({ verdict: refusal, admission: "refused", principal: null });
      expect(outcomes[1]).toEqual(outcomes[0]);
    },
  );
});
