import { chmodSync, mkdirSync, mkdtempSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import {
  ClientConfigError,
  CredentialsFileError,
  credentialsPath,
  parseServerAddress,
  readCredentialsFile,
  resolveClientOptions,
  UserAPI,
  writeProfile,
} from "../src/sdk/index.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

/** A fresh HOME with ~/.tessera/credentials holding `yaml` at `mode`. */
function homeWith(yaml: string, mode = 0o600): { home: string; file: string } {
  const home = mkdtempSync(join(tmpdir(), "tessera-home-"));
  mkdirSync(join(home, ".tessera"), { mode: 0o700 });
  const file = join(home, ".tessera", "credentials");
  writeFileSync(file, yaml, { mode });
  chmodSync(file, mode);
  return { home, file };
}

const PROFILES = `
default:
  server: dev.example.com:50052
  token: tsr_pat_defaulttoken0000000000000000000000000000000000000
  refresh_token: tsr_rt_defaultrefresh
staging:
  server: staging.example.com:7443
  token: tsr_pat_stagingtoken0000000000000000000000000000000000000
  cert_folder: /etc/tessera/staging
`;

describe("the credentials file", () => {
  it.each([0o644, 0o640, 0o604, 0o660, 0o602])(
    "refuses a file with mode %o, saying why and how to fix it",
    (mode) => {
      const { home, file } = homeWith(PROFILES, mode);
      let err: unknown;
      try {
        readCredentialsFile(credentialsPath({ HOME: home }));
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(CredentialsFileError);
      const message = (err as Error).message;
      expect(message).toContain(file);
      expect(message).toContain(`0${(mode & 0o777).toString(8)}`);
      expect(message).toContain("group or others");
      expect(message).toContain(`chmod 600 ${file}`);
      expect(message).not.toContain("tsr_pat_");
      // The factory refuses it the same way.
      expect(() => UserAPI.fromEnvironment({ env: { HOME: home } })).toThrow(CredentialsFileError);
    },
  );

  it("reads a 0600 file and picks the profile from the option, then TESSERA_PROFILE, then default", () => {
    const { home } = homeWith(PROFILES);
    expect(resolveClientOptions({ env: { HOME: home } }).options).toMatchObject({
      host: "dev.example.com",
      port: 50052,
      token: "tsr_pat_defaulttoken0000000000000000000000000000000000000",
      refreshToken: "tsr_rt_defaultrefresh",
    });
    const staging = resolveClientOptions({ env: { HOME: home, TESSERA_PROFILE: "staging" } });
    expect(staging.profile).toBe("staging");
    expect(staging.options).toMatchObject({
      host: "staging.example.com",
      port: 7443,
      certFolder: "/etc/tessera/staging",
    });
    expect(
      resolveClientOptions({ env: { HOME: home, TESSERA_PROFILE: "staging" }, profile: "default" }).options
        .host,
    ).toBe("dev.example.com");
  });

  it("reports a named profile that does not exist", () => {
    const { home, file } = homeWith(PROFILES);
    expect(() => resolveClientOptions({ env: { HOME: home }, profile: "prod" })).toThrow(
      `profile "prod" not found in ${file}`,
    );
  });

  it("writes profiles with mode 0600 in a 0700 folder and keeps the other profiles", () => {
    const home = mkdtempSync(join(tmpdir(), "tessera-home-"));
    const file = credentialsPath({ HOME: home });
    writeProfile("prod", { server: "prod.example.com:50052", token: "tsr_pat_prod" }, file);
    writeProfile("dev", { server: "localhost:50052", token: "t1", refresh_token: "r1" }, file);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(statSync(join(home, ".tessera")).mode & 0o777).toBe(0o700);
    expect(readCredentialsFile(file)).toEqual({
      prod: { server: "prod.example.com:50052", token: "tsr_pat_prod" },
      dev: { server: "localhost:50052", token: "t1", refresh_token: "r1" },
    });
    writeProfile("dev", undefined, file);
    expect(Object.keys(readCredentialsFile(file))).toEqual(["prod"]);
  });

  it("refuses to write into a file others can read", () => {
    const { file } = homeWith(PROFILES, 0o644);
    expect(() => writeProfile("dev", { token: "x" }, file)).toThrow(CredentialsFileError);
  });

  it("rejects unknown keys and malformed YAML without quoting the file's contents", () => {
    const bad = homeWith("default:\n  tokn: tsr_pat_secretvalue\n");
    expect(() => readCredentialsFile(bad.file)).toThrow('unknown key "tokn"');
    const broken = homeWith("default: [tsr_pat_secretvalue\n");
    let message = "";
    try {
      readCredentialsFile(broken.file);
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message).toContain("not valid YAML");
    expect(message).not.toContain("tsr_pat_secretvalue");
  });

  it("reads a tag it does not know as text without a process warning quoting the file's line", () => {
    const warnings = vi.spyOn(process, "emitWarning").mockImplementation(() => undefined);
    try {
      const tagged = homeWith("default:\n  token: !weird tsr_pat_secretvalue\n");
      expect(readCredentialsFile(tagged.file).default?.token).toBe("tsr_pat_secretvalue");
      expect(warnings.mock.calls.map((c) => String(c[0]))).toEqual([]);
    } finally {
      warnings.mockRestore();
    }
  });
});

describe("client settings from the environment", () => {
  it("lets explicit options win over the environment, and the environment over the profile", () => {
    const { home } = homeWith(PROFILES);
    const env = {
      HOME: home,
      TESSERA_TOKEN: "tsr_pat_fromenv",
      TESSERA_SERVER: "env.example.com:9000",
      TESSERA_CERT_FOLDER: "/env/certs",
    };
    expect(resolveClientOptions({ env }).options).toMatchObject({
      token: "tsr_pat_fromenv",
      host: "env.example.com",
      port: 9000,
      certFolder: "/env/certs",
    });
    expect(
      resolveClientOptions({ env, server: "flag.example.com:1234", token: "explicit", certFolder: "/flag" })
        .options,
    ).toMatchObject({
      token: "explicit",
      host: "flag.example.com",
      port: 1234,
      certFolder: "/flag",
    });
  });

  it("never pairs a token from the environment with the profile's refresh token", () => {
    const { home } = homeWith(PROFILES);
    const resolved = resolveClientOptions({ env: { HOME: home, TESSERA_TOKEN: "tsr_pat_fromenv" } });
    expect(resolved.options.token).toBe("tsr_pat_fromenv");
    expect(resolved.options.refreshToken).toBeUndefined();
    expect(resolved.options.host).toBe("dev.example.com");
  });

  it("does not read the credentials file when the environment names both token and server", () => {
    const { home } = homeWith(PROFILES, 0o644);
    const resolved = resolveClientOptions({
      env: { HOME: home, TESSERA_TOKEN: "t", TESSERA_SERVER: "a.example.com:1" },
    });
    expect(resolved.options).toMatchObject({ token: "t", host: "a.example.com", port: 1 });
    expect(resolved.profileData).toBeUndefined();
  });

  it("defaults to localhost:50052 without any settings", () => {
    const home = mkdtempSync(join(tmpdir(), "tessera-home-"));
    expect(resolveClientOptions({ env: { HOME: home } }).options).toMatchObject({
      host: "localhost",
      port: 50052,
      token: undefined,
    });
  });

  it.each([
    ["localhost:50052", { host: "localhost", port: 50052, tls: true }],
    ["tessera.example.com", { host: "tessera.example.com", port: 50052, tls: true }],
    ["10.0.0.7:443", { host: "10.0.0.7", port: 443, tls: true }],
    ["[::1]:7000", { host: "::1", port: 7000, tls: true }],
    ["https://tessera.example.com:8443", { host: "tessera.example.com", port: 8443, tls: true }],
    ["http://127.0.0.1:50052", { host: "127.0.0.1", port: 50052, tls: false }],
  ])("parses the server address %s", (value, expected) => {
    expect(parseServerAddress(value)).toEqual(expected);
  });

  it.each(["", "host:99999", "host:port", "ftp://host:1", "https://host:1/path", "a b:1"])(
    "rejects the server address %j",
    (value) => {
      expect(() => parseServerAddress(value)).toThrow(ClientConfigError);
    },
  );
});

describe("UserAPI.fromEnvironment against a real server", () => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
  });
  afterAll(async () => {
    await ts.close();
  });

  it("connects with the server, token and cert folder of a profile", async () => {
    const login = new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir });
    const session = await login.login("admin", ADMIN_PASSWORD);
    login.close();
    const home = mkdtempSync(join(tmpdir(), "tessera-home-"));
    writeProfile(
      "dev",
      {
        server: `127.0.0.1:${ts.server.port}`,
        token: session.accessToken,
        refresh_token: session.refreshToken,
        cert_folder: ts.certs.clientDir,
      },
      credentialsPath({ HOME: home }),
    );
    const api = UserAPI.fromEnvironment({ env: { HOME: home, TESSERA_PROFILE: "dev" } });
    try {
      expect(api.port).toBe(ts.server.port);
      const me = await api.getUser();
      expect(me.username).toBe("admin");
      expect(me.clientCertificate?.sha256Fingerprint).toBe(ts.certs.clientFingerprint);
      expect(api.currentRefreshToken).toBe(session.refreshToken);
    } finally {
      api.close();
    }
  });
});
