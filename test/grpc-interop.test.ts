import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer } from "./helpers.js";

/**
 * Interop: an independent gRPC implementation (@grpc/grpc-js) that loads the .proto
 * files directly (not our generated code) talks to the server over mutual TLS.
 */
const PROTO_DIR = join(import.meta.dirname, "..", "proto");

type Callback<T> = (err: grpc.ServiceError | null, res: T) => void;
interface UserServiceClient extends grpc.Client {
  Login(req: object, cb: Callback<{ accessToken: string; user: { username: string } }>): void;
  GetCurrentUser(
    req: object,
    md: grpc.Metadata,
    cb: Callback<{ username: string; permissions: string[]; clientCertificate?: { commonName: string } }>,
  ): void;
  ListUsers(req: object, md: grpc.Metadata, cb: Callback<{ users: unknown[] }>): void;
}

function loadUserService() {
  const def = protoLoader.loadSync(["tessera/v1/user_service.proto", "grpc/health/v1/health.proto"], {
    includeDirs: [PROTO_DIR],
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  // biome-ignore lint/suspicious/noExplicitAny: grpc-js package definitions are untyped
  const pkg = grpc.loadPackageDefinition(def) as any;
  return {
    UserService: pkg.tessera.v1.UserService as grpc.ServiceClientConstructor,
    Health: pkg.grpc.health.v1.Health as grpc.ServiceClientConstructor,
  };
}

/**
 * The error detail as a generic gRPC client reads it: `grpc-status-details-bin` decoded as
 * google.rpc.Status, and its Any unpacked as google.rpc.ErrorInfo, by protobufjs (the
 * runtime @grpc/proto-loader is built on) from the shipped .proto files, none of our code.
 */
const rpc = (() => {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) =>
    target.startsWith("google/protobuf/") ? target : join(PROTO_DIR, target);
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
  return { status: root.lookupType("google.rpc.Status"), errorInfo: root.lookupType("google.rpc.ErrorInfo") };
})();

function statusDetails(err: grpc.ServiceError) {
  const [bin] = err.metadata.get("grpc-status-details-bin") as Buffer[];
  expect(bin).toBeInstanceOf(Buffer);
  const status = rpc.status.toObject(rpc.status.decode(bin!)) as {
    code: number;
    message: string;
    details: { type_url: string; value: Uint8Array }[];
  };
  return {
    code: status.code,
    message: status.message,
    types: status.details.map((d) => d.type_url),
    info: rpc.errorInfo.toObject(rpc.errorInfo.decode(status.details[0]!.value)),
  };
}

const call = <T>(fn: (cb: Callback<T>) => void) =>
  new Promise<T>((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));

describe.each(DATABASES)("@grpc/grpc-js interop over mTLS on $name", (db) => {
  let ts: TestServer;
  let client: UserServiceClient;
  const { UserService, Health } = loadUserService();

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "require" } });
    const creds = grpc.credentials.createSsl(ts.certs.ca, ts.certs.clientKey, ts.certs.clientCert);
    client = new UserService(`localhost:${ts.server.port}`, creds) as unknown as UserServiceClient;
  });
  afterAll(async () => {
    client?.close();
    await ts.close();
  });

  it("logs in and gets the current user, with the client certificate visible to the server", async () => {
    const login = await call<{ accessToken: string; user: { username: string } }>((cb) =>
      client.Login({ username: "admin", password: ADMIN_PASSWORD }, cb),
    );
    expect(login.user.username).toBe("admin");
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${login.accessToken}`);
    const me = await call<{
      username: string;
      permissions: string[];
      clientCertificate?: { commonName: string };
    }>((cb) => client.GetCurrentUser({}, md, cb));
    expect(me.username).toBe("admin");
    expect(me.permissions).toEqual(["*"]);
    expect(me.clientCertificate?.commonName).toBe("test-client");
  });

  it("returns UNAUTHENTICATED with a WWW-Authenticate trailer when no token is sent", async () => {
    const err = await call((cb) => client.GetCurrentUser({}, new grpc.Metadata(), cb)).catch(
      (e: grpc.ServiceError) => e,
    );
    expect((err as grpc.ServiceError).code).toBe(grpc.status.UNAUTHENTICATED);
    expect((err as grpc.ServiceError).metadata.get("www-authenticate")[0]).toBe('Bearer realm="tessera"');
  });

  it("returns PERMISSION_DENIED for a missing scope and UNAUTHENTICATED for a bad token", async () => {
    const adminLogin = await call<{ accessToken: string }>((cb) =>
      client.Login({ username: "admin", password: ADMIN_PASSWORD }, cb),
    );
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${adminLogin.accessToken}`);
    const creator = new UserService(
      `localhost:${ts.server.port}`,
      grpc.credentials.createSsl(ts.certs.ca, ts.certs.clientKey, ts.certs.clientCert),
    );
    await call((cb) =>
      // biome-ignore lint/suspicious/noExplicitAny: dynamic client
      (creator as any).CreateUser(
        { username: "interop-reader", password: "long enough password", scopes: ["results:read"] },
        md,
        cb,
      ),
    );
    creator.close();
    const login = await call<{ accessToken: string }>((cb) =>
      client.Login({ username: "interop-reader", password: "long enough password" }, cb),
    );
    const readerMd = new grpc.Metadata();
    readerMd.set("authorization", `Bearer ${login.accessToken}`);
    readerMd.set("x-request-id", "interop-denied");
    const denied = await call((cb) => client.ListUsers({}, readerMd, cb)).catch((e: grpc.ServiceError) => e);
    expect((denied as grpc.ServiceError).code).toBe(grpc.status.PERMISSION_DENIED);
    expect(statusDetails(denied as grpc.ServiceError)).toEqual({
      code: grpc.status.PERMISSION_DENIED,
      message: "Insufficient permissions",
      types: ["type.googleapis.com/google.rpc.ErrorInfo"],
      info: {
        reason: "ACCESS_DENIED",
        domain: "tessera.dev",
        metadata: {
          required_scopes: "admin:users",
          request_id: "interop-denied",
        },
      },
    });
    const badMd = new grpc.Metadata();
    badMd.set("authorization", "Bearer not.a.jwt");
    badMd.set("x-request-id", "interop-bad-token");
    const bad = await call((cb) => client.GetCurrentUser({}, badMd, cb)).catch((e: grpc.ServiceError) => e);
    expect((bad as grpc.ServiceError).code).toBe(grpc.status.UNAUTHENTICATED);
    expect(statusDetails(bad as grpc.ServiceError).info).toEqual({
      reason: "TOKEN_INVALID",
      domain: "tessera.dev",
      metadata: { request_id: "interop-bad-token" },
    });
  });

  it("answers the standard health check", async () => {
    const health = new Health(
      `localhost:${ts.server.port}`,
      grpc.credentials.createSsl(ts.certs.ca, ts.certs.clientKey, ts.certs.clientCert),
    );
    // biome-ignore lint/suspicious/noExplicitAny: dynamic client
    const res = await call<{ status: string }>((cb) => (health as any).Check({ service: "" }, cb));
    health.close();
    expect(res.status).toBe("SERVING");
  });

  it("cannot connect without a client certificate in require mode", async () => {
    const noCert = new UserService(
      `localhost:${ts.server.port}`,
      grpc.credentials.createSsl(ts.certs.ca),
    ) as unknown as UserServiceClient;
    const err = await call((cb) => noCert.Login({ username: "admin", password: ADMIN_PASSWORD }, cb)).catch(
      (e: grpc.ServiceError) => e,
    );
    noCert.close();
    expect((err as grpc.ServiceError).code).toBe(grpc.status.UNAVAILABLE);
  });
});
