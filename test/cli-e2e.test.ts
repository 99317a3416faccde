import { chmodSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthenticationError, readCredentialsFile, UserAPI } from "../src/sdk/index.js";
import { type CliResult, closedPort, runCli } from "./cli-helpers.js";
import { ADMIN_PASSWORD, pinnableClock, SQLITE, startTestServer, type TestServer } from "./helpers.js";

/**
 * The `tessera` command line driven as a subprocess against a real server, with HOME
 * in a temporary folder. The tests run in order and share the session and token.
 */
describe("the tessera CLI end to end", () => {
  let ts: TestServer;
  let home: string;
  let env: Record<string, string>;
  let pat: { id: string; token: string };
  const tessera = (args: string[], extra: Record<string, string> = {}, input = "") =>
    runCli(args, { ...env, ...extra }, input);
  const json = <T>(r: CliResult): T => {
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as T;
  };

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    home = mkdtempSync(join(tmpdir(), "tessera-cli-home-"));
    env = {
      HOME: home,
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
    };
  });
  afterAll(async () => {
    await ts.close();
  });

  it("logs in with --password-stdin and stores the session in a 0600 profile, printing no token", async () => {
    const r = await tessera(["login", "--username", "admin", "--password-stdin"], {}, `${ADMIN_PASSWORD}\n`);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain("Logged in");
    const file = join(home, ".tessera", "credentials");
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(statSync(join(home, ".tessera")).mode & 0o777).toBe(0o700);
    const profile = readCredentialsFile(file).default!;
    expect(profile.server).toBe(`127.0.0.1:${ts.server.port}`);
    expect(profile.refresh_token).toMatch(/^tsr_rt_/);
    expect(profile.cert_folder).toBe(ts.certs.clientDir);
    expect(r.stdout + r.stderr).not.toContain(profile.token!);
    expect(r.stdout + r.stderr).not.toContain(ADMIN_PASSWORD);
  });

  it("logs in the user of the tenant --tenant names", async () => {
    const root = new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir });
    try {
      await root.login("admin", ADMIN_PASSWORD);
      const { tenant } = await root.tenants.createTenant({ name: "cli-tenant" });
      await root.users.createUser({
        username: "admin",
        password: "the other admin's password",
        tenantId: tenant!.id,
      });
      const r = await tessera(
        [
          "login",
          "-u",
          "admin",
          "--tenant",
          "cli-tenant",
          "--password-stdin",
          "--profile",
          "other",
          "--output",
          "json",
        ],
        {},
        "the other admin's password\n",
      );
      expect(json<{ user: { tenantId: string } }>(r).user.tenantId).toBe(tenant!.id);
    } finally {
      root.close();
    }
  });

  it("shows who is logged in", async () => {
    const me = json<{ username: string; permissions: string[]; clientCertificate: { commonName: string } }>(
      await tessera(["whoami", "--output", "json"]),
    );
    expect(me.username).toBe("admin");
    expect(me.permissions).toEqual(["*"]);
    expect(me.clientCertificate.commonName).toBe("test-client");
    const table = await tessera(["whoami"]);
    expect(table.stdout).toMatch(/^username\s+admin$/m);
  });

  it("creates a personal access token and prints it once, on stdout", async () => {
    const r = await tessera([
      "token",
      "create",
      "--name",
      "ci",
      "--scopes",
      "cluster:read",
      "--expires-in",
      "1d",
      "--output",
      "json",
    ]);
    const created = json<{ id: string; token: string; name: string; scopes: string[]; expiresAt: string }>(r);
    expect(created.token).toMatch(/^tsr_pat_/);
    expect(created.scopes).toEqual(["cluster:read"]);
    expect(new Date(created.expiresAt).getTime()).toBeGreaterThan(Date.now() + 23 * 3600_000);
    expect(r.stderr).not.toContain(created.token);
    pat = { id: created.id, token: created.token };
  });

  it("uses the token through TESSERA_TOKEN, limited to its scopes", async () => {
    const me = json<{ username: string; permissions: string[] }>(
      await tessera(["whoami", "--output", "json"], {
        TESSERA_TOKEN: pat.token,
        HOME: mkdtempSync(join(tmpdir(), "tessera-empty-")),
      }),
    );
    expect(me.username).toBe("admin");
    expect(me.permissions).toEqual(["cluster:read"]);
  });

  it("lists the token without its secret", async () => {
    const r = await tessera(["token", "list", "--output", "json"]);
    const listed = json<{ tokens: { id: string; name: string; hint: string; revoked: boolean }[] }>(r);
    const row = listed.tokens.find((t) => t.id === pat.id);
    expect(row).toMatchObject({ name: "ci", revoked: false });
    expect(row!.hint.startsWith("tsr_pat_")).toBe(true);
    expect(r.stdout).not.toContain(pat.token);
    const table = await tessera(["token", "list"]);
    expect(table.stdout).toMatch(new RegExp(`^${pat.id}\\s+ci\\s+`, "m"));
  });

  it("exits 4 when the credential lacks the scope a command needs", async () => {
    const r = await tessera(["tenant", "list"], { TESSERA_TOKEN: pat.token });
    expect(r.code).toBe(4);
    expect(r.stderr).toContain("ACCESS_DENIED");
    expect(r.stderr).toContain("admin:tenants");
  });

  it("revokes the token, which is then rejected with exit code 3", async () => {
    const r = await tessera(["token", "revoke", pat.id]);
    expect(r.code, r.stderr).toBe(0);
    const rejected = await tessera(["whoami"], { TESSERA_TOKEN: pat.token });
    expect(rejected.code).toBe(3);
    expect(rejected.stderr).toMatch(/^error: /);
    expect(rejected.stderr).not.toContain(pat.token);
    const listed = json<{ tokens: { id: string; revoked: boolean }[] }>(
      await tessera(["token", "list", "--include-revoked", "--output", "json"]),
    );
    expect(listed.tokens.find((t) => t.id === pat.id)?.revoked).toBe(true);
  });

  it("exits 5 for an id that does not exist", async () => {
    const r = await tessera(["token", "revoke", "00000000-0000-4000-8000-000000000000"]);
    expect(r.code).toBe(5);
    expect(r.stderr).toContain("NOT_FOUND");
  });

  it("exits 6 when the server cannot be reached", async () => {
    // A token of its own: the profile's session is for the server it was opened on.
    const r = await tessera(["whoami", "--server", `127.0.0.1:${await closedPort()}`], {
      TESSERA_TOKEN: "tsr_pat_any",
    });
    expect(r.code).toBe(6);
    expect(r.stderr).toContain("server unavailable");
  });

  it("exits 2 on usage errors", async () => {
    expect((await tessera(["token", "create"])).code).toBe(2);
    expect((await tessera(["whoami", "--output", "xml"])).code).toBe(2);
    expect((await tessera(["whoami", "--server", "not a server"])).code).toBe(2);
    expect((await tessera(["no-such-command"])).code).toBe(2);
  });

  it("documents the exit codes and the credential sources in --help", async () => {
    const r = await tessera(["--help"]);
    expect(r.code).toBe(0);
    for (const line of [
      "3  unauthenticated",
      "4  permission denied",
      "5  not found",
      "6  unavailable",
      "7  rate limited",
      "8  already exists",
    ])
      expect(r.stdout).toContain(line);
    expect(r.stdout).toContain("TESSERA_TOKEN");
    expect(r.stdout).toContain("~/.tessera/credentials");
  });

  it("refuses a credentials file that others can read, saying how to fix it", async () => {
    const file = join(home, ".tessera", "credentials");
    chmodSync(file, 0o644);
    try {
      const r = await tessera(["whoami"]);
      expect(r.code).toBe(2);
      expect(r.stderr).toContain(`chmod 600 ${file}`);
    } finally {
      chmodSync(file, 0o600);
    }
  });

  it("logs out: the server ends the session and the profile loses its tokens", async () => {
    const file = join(home, ".tessera", "credentials");
    const before = readCredentialsFile(file).default!;
    const r = await tessera(["logout"]);
    expect(r.code, r.stderr).toBe(0);
    const after = readCredentialsFile(file).default!;
    expect(after.token).toBeUndefined();
    expect(after.refresh_token).toBeUndefined();
    expect(after.server).toBe(before.server);
    expect(readFileSync(file, "utf8")).not.toContain(before.refresh_token!);

    const api = new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir });
    const err = await api.refreshToken(before.refresh_token).catch((e: unknown) => e);
    api.close();
    expect(err).toBeInstanceOf(AuthenticationError);
    expect((err as AuthenticationError).reason).toBe("TOKEN_REVOKED");

    const whoami = await tessera(["whoami"]);
    expect(whoami.code).toBe(3);
    expect(whoami.stderr).toContain("tessera login");
  });
});

describe("the tessera CLI and an expiring session", () => {
  let ts: TestServer;
  // The server's clock, pinned to step it across the session's expiry (the CLI, another
  // process, reads the machine's clock, which the test leaves alone).
  const clock = pinnableClock();
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { auth: { jwt: { accessTokenTtl: 2, clockSkew: 0 } } }, undefined, {
      clock: clock.now,
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  it("renews an expired access token with the profile's refresh token and saves the new pair", async () => {
    const home = mkdtempSync(join(tmpdir(), "tessera-cli-refresh-"));
    const env = {
      HOME: home,
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
    };
    try {
      // Logged in a minute ahead of the machine's clock: the CLI never sees the token as
      // about to expire, so only the server's refusal can make it renew.
      clock.pin(Date.now() + 60_000);
      expect((await runCli(["login", "-u", "admin", "--password-stdin"], env, ADMIN_PASSWORD)).code).toBe(0);
      const file = join(home, ".tessera", "credentials");
      const before = readCredentialsFile(file).default!;
      const exp = (
        JSON.parse(Buffer.from(before.token!.split(".")[1]!, "base64url").toString()) as { exp: number }
      ).exp;
      const whoami = async () => {
        const r = await runCli(["whoami", "--output", "json"], env);
        expect(r.code, r.stderr).toBe(0);
        expect((JSON.parse(r.stdout) as { username: string }).username).toBe("admin");
      };

      clock.pin(exp * 1000 - 1);
      await whoami();
      expect(readCredentialsFile(file).default!.token).toBe(before.token);

      clock.pin(exp * 1000);
      await whoami();
      const after = readCredentialsFile(file).default!;
      expect(after.token).not.toBe(before.token);
      expect(after.refresh_token).not.toBe(before.refresh_token);
      expect(statSync(file).mode & 0o777).toBe(0o600);
    } finally {
      clock.release();
    }
  });
});

describe("the tessera CLI against a rate-limited server", () => {
  it("exits 7 and prints the server's Retry-After once the per-IP limit is spent", async () => {
    const ts = await startTestServer(SQLITE, { rateLimit: { enabled: true, perIpPerMinute: 3 } });
    try {
      const env = {
        HOME: mkdtempSync(join(tmpdir(), "tessera-cli-home-")),
        TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
        TESSERA_CERT_FOLDER: ts.certs.clientDir,
        // Any token: the per-IP limit refuses before authentication once spent.
        TESSERA_TOKEN: "not-a-token",
      };
      const results: CliResult[] = [];
      for (let i = 0; i < 5; i++) results.push(await runCli(["whoami"], env));
      // The first three are counted and refused as unauthenticated (3); then the limit answers.
      expect(results.slice(0, 3).map((r) => r.code)).toEqual([3, 3, 3]);
      const limited = results[3]!;
      expect(limited.code, limited.stderr).toBe(7);
      expect(limited.stderr).toContain("RATE_LIMITED");
      const retryAfter = /Retry-After: (\d+)/.exec(limited.stderr);
      expect(retryAfter, limited.stderr).not.toBeNull();
      expect(Number(retryAfter![1])).toBeGreaterThan(0);
      expect(Number(retryAfter![1])).toBeLessThanOrEqual(60);
    } finally {
      await ts.close();
    }
  });
});
