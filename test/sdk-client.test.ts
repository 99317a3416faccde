import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  AuthenticationError,
  ClientConfigError,
  Code,
  MachineAuthType,
  PermissionDeniedError,
  UnavailableError,
  UserAPI,
  type UserAPIOptions,
} from "../src/sdk/index.js";
import { ADMIN_PASSWORD, DATABASES, SQLITE, startTestServer, type TestServer } from "./helpers.js";

const PROTOCOLS = [{ protocol: "grpc" as const }, { protocol: "connect" as const }];

describe.each(DATABASES)("UserAPI against a real server on $name", (db) => {
  let ts: TestServer;
  const open: UserAPI[] = [];
  const make = (options: UserAPIOptions) => {
    const api = new UserAPI({ host: "127.0.0.1", port: ts.server.port, ...options });
    open.push(api);
    return api;
  };

  beforeAll(async () => {
    ts = await startTestServer(db);
  });
  afterEach(() => {
    for (const api of open.splice(0)) api.close();
  });
  afterAll(async () => {
    await ts.close();
  });

  describe.each(PROTOCOLS)("over $protocol", ({ protocol }) => {
    it("answers the health check, logs in and reports the user with its permissions", async () => {
      const api = make({ protocol, caFile: join(ts.certs.dir, "ca.crt") });
      expect(await api.isAvailable()).toBe(true);
      const login = await api.login("admin", ADMIN_PASSWORD);
      expect(login.user.username).toBe("admin");
      expect(login.accessTokenExpiresAt!.getTime()).toBeGreaterThan(Date.now());
      expect(login.refreshToken).toMatch(/^tsr_rt_/);
      expect(api.token).toBe(login.accessToken);
      const me = await api.getUser();
      expect(me).toMatchObject({
        id: login.user.id,
        username: "admin",
        tenantId: login.user.tenantId,
        permissions: ["*"],
      });
      expect(me.clientCertificate).toBeUndefined();
      expect(await api.hasPermission("admin:users")).toBe(true);
    });

    it("presents the cert folder's client certificate for mutual TLS", async () => {
      const api = make({ protocol, certFolder: ts.certs.clientDir });
      await api.login("admin", ADMIN_PASSWORD);
      const me = await api.getUser();
      expect(me.clientCertificate?.commonName).toBe("test-client");
      expect(me.clientCertificate?.sha256Fingerprint).toBe(ts.certs.clientFingerprint);
    });

    it("uses a token given to the constructor and checks permissions with the server's wildcard rules", async () => {
      const admin = make({ protocol, certFolder: ts.certs.clientDir });
      await admin.login("admin", ADMIN_PASSWORD);
      const username = `reader-${protocol}`;
      await admin.users.createUser({
        username,
        password: "a long enough password",
        scopes: ["cluster:read", "swarm:*"],
      });
      const session = await make({ protocol, certFolder: ts.certs.clientDir }).login(
        username,
        "a long enough password",
      );

      const reader = make({ protocol, certFolder: ts.certs.clientDir, token: session.accessToken });
      expect((await reader.getUser()).permissions.sort()).toEqual(["cluster:read", "swarm:*"]);
      expect(await reader.hasPermission("cluster:read")).toBe(true);
      expect(await reader.hasPermission("swarm:deploy")).toBe(true);
      expect(await reader.hasPermission("cluster:write")).toBe(false);
      expect(await reader.hasPermission("admin:users")).toBe(false);
    });

    it("refreshes the session: the client uses the new pair and the spent refresh token is refused", async () => {
      const api = make({ protocol, certFolder: ts.certs.clientDir });
      const login = await api.login("admin", ADMIN_PASSWORD);
      const pair = await api.refreshToken(login.refreshToken);
      expect(pair.accessToken).not.toBe(login.accessToken);
      expect(pair.refreshToken).not.toBe(login.refreshToken);
      expect(api.token).toBe(pair.accessToken);
      expect(api.currentRefreshToken).toBe(pair.refreshToken);
      expect((await api.getUser()).username).toBe("admin");

      const other = make({ protocol, certFolder: ts.certs.clientDir });
      const err = await other.refreshToken(login.refreshToken).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(AuthenticationError);
      expect((err as AuthenticationError).reason).toBe("TOKEN_REVOKED");
      expect((err as Error).message).not.toContain(login.refreshToken);
    });

    it("logs out: the session's refresh token stops working and the client forgets its tokens", async () => {
      const api = make({ protocol, certFolder: ts.certs.clientDir });
      const login = await api.login("admin", ADMIN_PASSWORD);
      await api.logout();
      expect(api.token).toBeUndefined();
      expect(api.currentRefreshToken).toBeUndefined();
      const err = await api.refreshToken(login.refreshToken).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(AuthenticationError);
      expect((err as AuthenticationError).reason).toBe("TOKEN_REVOKED");
    });
  });

  it("logs in the user of the tenant it names, and without one the user of that name created first", async () => {
    const admin = make({ certFolder: ts.certs.clientDir });
    await admin.login("admin", ADMIN_PASSWORD);
    const { tenant } = await admin.tenants.createTenant({ name: `sdk-tenant-${db.name}` });
    // "admin" again, in another tenant: usernames are unique per tenant.
    await admin.users.createUser({
      username: "admin",
      password: "the other admin's password",
      tenantId: tenant!.id,
    });
    const other = await make({ certFolder: ts.certs.clientDir }).login(
      "admin",
      "the other admin's password",
      {
        tenant: tenant!.name,
      },
    );
    expect(other.user.tenantId).toBe(tenant!.id);
    const first = await make({ certFolder: ts.certs.clientDir }).login("admin", ADMIN_PASSWORD);
    expect(first.user.tenantId).not.toBe(tenant!.id);
    expect(first.user.permissions).toEqual(["*"]);
  });

  it("authenticates a machine user with its bearer token or its Basic credentials", async () => {
    const admin = make({ certFolder: ts.certs.clientDir });
    await admin.login("admin", ADMIN_PASSWORD);
    const bearer = await admin.machineUsers.createMachineUser({
      name: `sdk-bearer-${db.name}`,
      authType: MachineAuthType.BEARER,
    });
    const basic = await admin.machineUsers.createMachineUser({
      name: `sdk-basic-${db.name}`,
      authType: MachineAuthType.BASIC,
    });

    const withToken = make({ certFolder: ts.certs.clientDir, token: bearer.token });
    expect(await withToken.machineUsers.checkAuthentication({})).toMatchObject({
      authenticated: true,
      machineUserId: bearer.machineUser!.id,
    });
    const withBasic = make({
      certFolder: ts.certs.clientDir,
      basicAuth: { username: basic.username, password: basic.password },
    });
    expect(await withBasic.machineUsers.checkAuthentication({})).toMatchObject({
      authenticated: true,
      machineUserId: basic.machineUser!.id,
    });

    const wrong = make({
      certFolder: ts.certs.clientDir,
      basicAuth: { username: basic.username, password: "wrong-password-here" },
    });
    const err = await wrong.machineUsers.checkAuthentication({}).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AuthenticationError);
    expect((err as AuthenticationError).reason).toBe("CREDENTIALS_INVALID");
    expect((err as Error).message).not.toContain("wrong-password-here");
    // A machine user is not a user: GetCurrentUser does not admit it.
    const denied = await withToken.getUser().catch((e: unknown) => e);
    expect(denied).toBeInstanceOf(PermissionDeniedError);
    expect((denied as PermissionDeniedError).reason).toBe("PRINCIPAL_NOT_ALLOWED");
  });

  it("reaches every service through its typed client", async () => {
    const api = make({ certFolder: ts.certs.clientDir });
    await api.login("admin", ADMIN_PASSWORD);
    expect((await api.users.listUsers({})).users.map((u) => u.username)).toContain("admin");
    expect((await api.tenants.listTenants({})).tenants.length).toBeGreaterThan(0);
    expect((await api.machineUsers.listMachineUsers({})).machineUsers).toEqual(expect.any(Array));
    const created = await api.tokens.createPersonalAccessToken({
      name: `sdk-${db.name}`,
      scopes: ["cluster:read"],
    });
    expect(created.token).toMatch(/^tsr_pat_/);
    const withPat = make({ certFolder: ts.certs.clientDir, token: created.token });
    expect(await withPat.getUser()).toMatchObject({ username: "admin", permissions: ["cluster:read"] });
    await api.tokens.revokePersonalAccessToken({ id: created.id });
    const err = await withPat.getUser().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AuthenticationError);
    expect((err as AuthenticationError).code).toBe(Code.Unauthenticated);
    expect((err as Error).message).not.toContain(created.token);
  });
});

describe("UserAPI and a server that requires client certificates", () => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { mtls: "require" } });
  });
  afterAll(async () => {
    await ts.close();
  });

  it.each(PROTOCOLS)(
    "is refused without a client certificate and served with the cert folder's over $protocol",
    async ({ protocol }) => {
      const without = new UserAPI({
        host: "127.0.0.1",
        port: ts.server.port,
        caFile: join(ts.certs.dir, "ca.crt"),
        protocol,
      });
      const withCert = new UserAPI({
        host: "127.0.0.1",
        port: ts.server.port,
        certFolder: ts.certs.clientDir,
        protocol,
      });
      try {
        expect(await without.isAvailable({ timeoutMs: 3000 })).toBe(false);
        const err = await without.login("admin", ADMIN_PASSWORD).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(UnavailableError);
        expect((err as UnavailableError).code).toBe(Code.Unavailable);
        expect((err as Error).message).toContain("requires a client certificate");

        expect(await withCert.isAvailable()).toBe(true);
        await withCert.login("admin", ADMIN_PASSWORD);
        expect((await withCert.getUser()).clientCertificate?.sha256Fingerprint).toBe(
          ts.certs.clientFingerprint,
        );
      } finally {
        without.close();
        withCert.close();
      }
    },
  );

  it("does not trust the server without the right CA (system roots only)", async () => {
    const api = new UserAPI({ host: "127.0.0.1", port: ts.server.port });
    try {
      expect(await api.isAvailable({ timeoutMs: 3000 })).toBe(false);
      const err = await api.getUser().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as Error).message).toContain("cannot verify the server's certificate");
    } finally {
      api.close();
    }
  });
});

describe("UserAPI configuration errors", () => {
  const dir = () => mkdtempSync(join(tmpdir(), "tessera-sdk-"));

  it("names a cert folder that does not exist", () => {
    const missing = join(dir(), "nope");
    let err: unknown;
    try {
      new UserAPI({ certFolder: missing });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ClientConfigError);
    expect((err as ClientConfigError).path).toBe(missing);
    expect((err as Error).message).toContain(missing);
  });

  it("names the missing ca.crt of a cert folder", () => {
    const d = dir();
    expect(() => new UserAPI({ certFolder: d })).toThrow(
      `cannot read CA certificate ${join(d, "ca.crt")}: no such file`,
    );
  });

  it("says the errno code of a file error it has no words for", () => {
    const d = dir();
    expect(() => new UserAPI({ caFile: d })).toThrow(`cannot read CA file ${d}: EISDIR`);
  });

  it("names the missing half of a client certificate pair", async () => {
    const d = dir();
    const { createTestCerts } = await import("./helpers.js");
    const certs = await createTestCerts();
    writeFileSync(join(d, "ca.crt"), certs.ca);
    writeFileSync(join(d, "client.crt"), certs.clientCert);
    expect(() => new UserAPI({ certFolder: d })).toThrow(join(d, "client.key"));
  });

  it("refuses a CA file that is not PEM, naming it", () => {
    const f = join(dir(), "ca.pem");
    writeFileSync(f, "not a certificate");
    expect(() => new UserAPI({ caFile: f })).toThrow(ClientConfigError);
    expect(() => new UserAPI({ caFile: f })).toThrow(f);
  });

  it("refuses a token that cannot be a header value without echoing it", () => {
    const token = "secret-token-value\nInjected: header";
    let message = "";
    try {
      new UserAPI({ token });
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message).toContain("token");
    expect(message).not.toContain("secret-token-value");
  });

  it("refuses an invalid port", () => {
    expect(() => new UserAPI({ port: 70000 })).toThrow(ClientConfigError);
  });
});
