import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as sdk from "../src/sdk/index.js";
import {
  ClientConfigError,
  Code,
  CredentialsFileError,
  resolveClientOptions,
  TesseraClientError,
  UnavailableError,
  UserAPI,
} from "../src/sdk/index.js";
import { ADMIN_PASSWORD, DATABASES, startTestServer, type TestServer } from "./helpers.js";

describe("the SDK's errors", () => {
  it("all extend TesseraClientError, ClientConfigError and CredentialsFileError included", () => {
    const errorClasses = Object.entries(sdk).filter(
      ([name, value]) => /^[A-Z]\w*Error$/.test(name) && typeof value === "function",
    );
    // The barrel names twelve error classes; a new one must extend the base class too.
    expect(errorClasses.map(([name]) => name).sort()).toEqual([
      "AlreadyExistsError",
      "AuthenticationError",
      "ClientConfigError",
      "CredentialsFileError",
      "InvalidArgumentError",
      "MessageTooLargeError",
      "NotFoundError",
      "PermissionDeniedError",
      "RateLimitedError",
      "TesseraClientError",
      "TokenExpiredError",
      "UnavailableError",
    ]);
    for (const [name, cls] of errorClasses) {
      expect((cls as { prototype: object }).prototype, name).toBeInstanceOf(Error);
      if (name !== "TesseraClientError")
        expect((cls as { prototype: object }).prototype, name).toBeInstanceOf(TesseraClientError);
    }
  });

  it("gives a client-side configuration error the InvalidArgument code, its path and no server reason", () => {
    const err = new CredentialsFileError("mode 0644", { path: "/tmp/x" });
    expect(err).toBeInstanceOf(TesseraClientError);
    expect(err).toBeInstanceOf(ClientConfigError);
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.path).toBe("/tmp/x");
    expect(err.reason).toBeUndefined();
    expect(err.requestId).toBeUndefined();
    expect(sdk.toClientError(err)).toBe(err);
  });

  it("refuses a token that cannot be a header value with a ClientConfigError that does not echo it", () => {
    const token = "tsr_pat_secret value";
    let caught: unknown;
    try {
      new UserAPI({ token });
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(ClientConfigError);
    expect(String((caught as Error).message)).not.toContain("secret");
    expect(() => new UserAPI({}).setToken("a\nb")).toThrow(ClientConfigError);
  });
});

describe("verifySsl: false", () => {
  it("is refused without insecure: true, before any connection is made", () => {
    expect(() => new UserAPI({ verifySsl: false })).toThrow(ClientConfigError);
    expect(() => new UserAPI({ verifySsl: false, insecure: false })).toThrow(/insecure: true/);
    // Verification on is the default; insecure alone changes nothing.
    expect(() => new UserAPI({ verifySsl: true }).close()).not.toThrow();
    expect(() => new UserAPI({ insecure: true }).close()).not.toThrow();
  });

  it("is refused from fromEnvironment too: the environment cannot turn verification off", () => {
    expect(() =>
      UserAPI.fromEnvironment({
        verifySsl: false,
        env: { TESSERA_SERVER: "localhost:1", TESSERA_TOKEN: "t" },
      }),
    ).toThrow(ClientConfigError);
  });
});

describe.each(DATABASES)("verifySsl against a real server on $name", (db) => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(db);
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("fails the handshake with a server whose CA the client does not trust, by default", async () => {
    // No certFolder and no caFile: the system roots, which do not hold the test CA.
    const api = new UserAPI({ host: "127.0.0.1", port: ts.server.port });
    try {
      expect(await api.isAvailable()).toBe(false);
      const err = await api.login("admin", ADMIN_PASSWORD).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as UnavailableError).message).toMatch(/TLS handshake failed/);
    } finally {
      api.close();
    }
  });

  it("talks to that server with verifySsl: false and insecure: true", async () => {
    const api = new UserAPI({ host: "127.0.0.1", port: ts.server.port, verifySsl: false, insecure: true });
    try {
      expect(await api.isAvailable()).toBe(true);
      await api.login("admin", ADMIN_PASSWORD);
      expect((await api.getUser()).username).toBe("admin");
    } finally {
      api.close();
    }
  });

  it("still presents the cert folder's client certificate with verification off", async () => {
    const api = new UserAPI({
      host: "127.0.0.1",
      port: ts.server.port,
      certFolder: ts.certs.clientDir,
      verifySsl: false,
      insecure: true,
    });
    try {
      await api.login("admin", ADMIN_PASSWORD);
      expect((await api.getUser()).clientCertificate?.sha256Fingerprint).toBe(ts.certs.clientFingerprint);
    } finally {
      api.close();
    }
  });

  it("is the same client as verification on when the CA is trusted", async () => {
    const api = new UserAPI({
      host: "127.0.0.1",
      port: ts.server.port,
      caFile: join(ts.certs.dir, "ca.crt"),
    });
    try {
      expect(await api.isAvailable()).toBe(true);
    } finally {
      api.close();
    }
  });
});

describe("profiles per environment, as the README documents them", () => {
  const readme = readFileSync(fileURLToPath(new URL("../README.md", import.meta.url)), "utf8");
  const section = readme.slice(readme.indexOf("#### Several environments: profiles"));
  const yamlBlock = /```yaml\n([\s\S]*?)```/.exec(section)![1]!;

  it("resolves dev, staging and prod from the README's file, each with its own server, cert folder and token", () => {
    const file = join(mkdtempSync(join(tmpdir(), "tessera-profiles-")), "credentials");
    writeFileSync(file, yamlBlock, { mode: 0o600 });
    const resolve = (profile: string, env: Record<string, string> = {}) =>
      resolveClientOptions({ profile, credentialsFile: file, env }).options;
    expect(resolve("dev")).toMatchObject({
      host: "localhost",
      port: 50052,
      certFolder: "/home/me/.tessera/certs/dev",
      token: "tsr_pat_…",
    });
    expect(resolve("staging")).toMatchObject({
      host: "tessera.staging.example.com",
      certFolder: "/home/me/.tessera/certs/staging",
    });
    expect(resolve("prod")).toMatchObject({
      host: "tessera.example.com",
      port: 443,
      certFolder: "/etc/tessera/certs",
      token: "eyJ…",
      refreshToken: "tsr_rt_…",
    });
    // The environment wins, and its token is never paired with the profile's refresh token.
    const fromEnv = resolve("prod", { TESSERA_TOKEN: "tsr_pat_env" });
    expect(fromEnv.token).toBe("tsr_pat_env");
    expect(fromEnv.refreshToken).toBeUndefined();
    // A profile the code names but the file lacks is an error, not another environment.
    expect(() => resolve("qa")).toThrow(ClientConfigError);
  });

  it.each(DATABASES)("reaches a real server through a profile on $name", async (db) => {
    const ts = await startTestServer(db);
    const setup = new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir });
    try {
      await setup.login("admin", ADMIN_PASSWORD);
      const { token } = await setup.tokens.createPersonalAccessToken({ name: "dev profile" });
      const file = join(mkdtempSync(join(tmpdir(), "tessera-profiles-")), "credentials");
      writeFileSync(
        file,
        `dev:\n  server: localhost:${ts.server.port}\n  cert_folder: ${ts.certs.clientDir}\n  token: ${token}\n` +
          "prod:\n  server: localhost:1\n  token: tsr_pat_not_this_one\n",
        { mode: 0o600 },
      );
      const api = UserAPI.fromEnvironment({ profile: "dev", credentialsFile: file, env: {} });
      try {
        expect((await api.getUser()).username).toBe("admin");
      } finally {
        api.close();
      }
    } finally {
      setup.close();
      await ts.close();
    }
  });
});
