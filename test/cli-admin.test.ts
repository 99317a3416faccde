import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createClientCertificate } from "../src/certs/dev-ca.js";
import { type CliResult, runCli } from "./cli-helpers.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

/**
 * The administration commands (tenant, app, api-key, machine-user) driven as a
 * subprocess against a real server. The tests run in order and share what they create.
 */
describe("the tessera CLI administration commands", () => {
  let ts: TestServer;
  let env: Record<string, string>;
  const ids: Record<string, string> = {};
  const tessera = (args: string[], extra: Record<string, string> = {}, input = "") =>
    runCli(args, { ...env, ...extra }, input);
  const json = <T>(r: CliResult): T => {
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as T;
  };
  /** A machine-user environment: no profile, only what the test passes. */
  const bare = () => ({ HOME: mkdtempSync(join(tmpdir(), "tessera-machine-")) });

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { allowLoopbackHttpCallbacks: true } });
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-admin-")),
      TESSERA_SERVER: `127.0.0.1:${ts.server.port}`,
      TESSERA_CERT_FOLDER: ts.certs.clientDir,
    };
    const login = await tessera(["login", "-u", "admin", "--password-stdin"], {}, ADMIN_PASSWORD);
    expect(login.code, login.stderr).toBe(0);
  });
  afterAll(async () => {
    await ts.close();
  });

  it("creates, lists, disables and re-enables a tenant", async () => {
    const created = json<{ id: string; name: string; disabled: boolean }>(
      await tessera(["tenant", "create", "acme", "--output", "json"]),
    );
    expect(created).toMatchObject({ name: "acme", disabled: false });
    ids.tenant = created.id;
    const listed = json<{ tenants: { id: string; name: string }[] }>(
      await tessera(["tenant", "list", "--output", "json"]),
    );
    expect(listed.tenants.map((t) => t.name)).toEqual(expect.arrayContaining(["default", "acme"]));
    expect(
      json<{ disabled: boolean }>(await tessera(["tenant", "disable", created.id, "--output", "json"]))
        .disabled,
    ).toBe(true);
    const table = await tessera(["tenant", "list"]);
    expect(table.stdout).toMatch(new RegExp(`^${created.id}\\s+acme\\s+disabled`, "m"));
    expect(
      json<{ disabled: boolean }>(await tessera(["tenant", "enable", created.id, "--output", "json"]))
        .disabled,
    ).toBe(false);
    expect((await tessera(["tenant", "disable", "00000000-0000-4000-8000-000000000000"])).code).toBe(5);
  });

  it("creates and lists applications", async () => {
    const app = json<{ id: string; name: string }>(
      await tessera(["app", "create", "billing", "--output", "json"]),
    );
    expect(app.name).toBe("billing");
    ids.app = app.id;
    const listed = json<{ applications: { id: string }[] }>(
      await tessera(["app", "list", "--output", "json"]),
    );
    expect(listed.applications.map((a) => a.id)).toContain(app.id);
  });

  it("creates an API key, prints it once under the RPC's own `key`, lists and revokes it", async () => {
    const r = await tessera(["api-key", "create", "--name", "integration", "--output", "json"]);
    const parsed = json<{ id: string; key: string; token?: string }>(r);
    expect(parsed.key).toMatch(/^tsr_key_/);
    expect(parsed.token).toBeUndefined();
    const created = { id: parsed.id, token: parsed.key };
    const me = json<{ username: string }>(
      await tessera(["whoami", "--output", "json"], { ...bare(), TESSERA_TOKEN: created.token }),
    );
    expect(me.username).toBe("admin");
    const listed = await tessera(["api-key", "list", "--output", "json"]);
    expect(json<{ apiKeys: { id: string }[] }>(listed).apiKeys.map((k) => k.id)).toContain(created.id);
    expect(listed.stdout).not.toContain(created.token);
    expect((await tessera(["api-key", "revoke", created.id])).code).toBe(0);
    expect((await tessera(["whoami"], { ...bare(), TESSERA_TOKEN: created.token })).code).toBe(3);
  });

  it("creates a bearer machine user whose token passes check, rotates it, and deletes it", async () => {
    const created = json<{ machineUser: { id: string; name: string }; token: string }>(
      await tessera([
        "machine-user",
        "create",
        "--name",
        "backend",
        "--scopes",
        "cluster:read",
        "--app",
        ids.app!,
        "--output",
        "json",
      ]),
    );
    expect(created.token).toMatch(/^tsr_mu_/);
    ids.machine = created.machineUser.id;

    const check = await tessera(
      ["machine-user", "check", "--token-stdin", "--output", "json"],
      bare(),
      created.token,
    );
    expect(json<{ authenticated: boolean; machineUserId: string }>(check)).toMatchObject({
      authenticated: true,
      machineUserId: ids.machine,
    });
    const viaEnv = await tessera(["machine-user", "check", "--output", "json"], {
      ...bare(),
      TESSERA_TOKEN: created.token,
    });
    expect(json<{ machineUserId: string }>(viaEnv).machineUserId).toBe(ids.machine);

    const listed = json<{ machineUsers: { id: string; scopes: string[] }[] }>(
      await tessera(["machine-user", "list", "--output", "json"]),
    );
    expect(listed.machineUsers.find((m) => m.id === ids.machine)?.scopes).toEqual(["cluster:read"]);

    const rotated = json<{ token: string }>(
      await tessera(["machine-user", "rotate", ids.machine, "--output", "json"]),
    );
    expect(rotated.token).toMatch(/^tsr_mu_/);
    expect(rotated.token).not.toBe(created.token);
    expect((await tessera(["machine-user", "check", "--token-stdin"], bare(), created.token)).code).toBe(3);
    expect((await tessera(["machine-user", "check", "--token-stdin"], bare(), rotated.token)).code).toBe(0);

    expect((await tessera(["machine-user", "delete", ids.machine])).code).toBe(0);
    expect((await tessera(["machine-user", "check", "--token-stdin"], bare(), rotated.token)).code).toBe(3);
    expect((await tessera(["machine-user", "delete", ids.machine])).code).toBe(5);
  });

  it("creates a Basic machine user whose username and password pass check", async () => {
    const created = json<{ username: string; password: string; token: string }>(
      await tessera([
        "machine-user",
        "create",
        "--name",
        "legacy",
        "--auth-type",
        "basic",
        "--output",
        "json",
      ]),
    );
    expect(created.username).toMatch(/^mu_/);
    expect(created.password.length).toBeGreaterThanOrEqual(16);
    expect(created.token).toBe("");
    const check = await tessera(
      ["machine-user", "check", "--username", created.username, "--password-stdin", "--output", "json"],
      bare(),
      `${created.password}\n`,
    );
    expect(json<{ authenticated: boolean }>(check).authenticated).toBe(true);
    const wrong = await tessera(
      ["machine-user", "check", "--username", created.username, "--password-stdin"],
      bare(),
      "not-the-password\n",
    );
    expect(wrong.code).toBe(3);
    expect(wrong.stderr).not.toContain("not-the-password");
  });

  it("lets a bound client certificate alone pass check", async () => {
    const created = json<{ machineUser: { id: string } }>(
      await tessera(["machine-user", "create", "--name", "mtls-backend", "--output", "json"]),
    );
    // A certificate from the server's CA that no one has bound yet.
    const folder = join(mkdtempSync(join(tmpdir(), "tessera-mtls-")), "mtls-backend");
    const issued = await createClientCertificate(ts.certs.dir, "mtls-backend", folder);
    const bound = await tessera([
      "machine-user",
      "bind-cert",
      created.machineUser.id,
      "--fingerprint",
      issued.sha256Fingerprint,
    ]);
    expect(bound.code, bound.stderr).toBe(0);
    const check = await tessera(["machine-user", "check", "--output", "json"], {
      ...bare(),
      TESSERA_CERT_FOLDER: folder,
    });
    expect(json<{ machineUserId: string }>(check).machineUserId).toBe(created.machineUser.id);
    // Without the certificate there is no credential at all.
    expect(
      (
        await tessera(["machine-user", "check"], {
          ...bare(),
          TESSERA_CERT_FOLDER: "",
          TESSERA_CA_FILE: join(ts.certs.dir, "ca.crt"),
        })
      ).code,
    ).toBe(3);
  });
});
