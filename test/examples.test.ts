import { execFile, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";
import { SHELL_WALKTHROUGHS } from "./walkthroughs.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "bin", "tessera.js");
const ADMIN_TOKEN = "static-admin-token-of-the-examples-test-0123456789";

/** Run an examples/ script as a user would (executed from the checkout, its own environment), collecting its output. */
function runScript(
  script: string,
  env: Record<string, string>,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(
      join(ROOT, script),
      [],
      { cwd: ROOT, env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...env }, timeout: 600_000 },
      (err, stdout, stderr) => {
        if (err && typeof (err as { code?: unknown }).code !== "number")
          return reject(new Error(`${script}: ${err.message}\n${stdout}\n${stderr}`));
        resolve({ code: err ? (err as unknown as { code: number }).code : 0, stdout, stderr });
      },
    );
  });
}

/** Files git would report as new (untracked and not ignored). */
const untracked = (): string[] =>
  execFileSync("git", ["ls-files", "--others", "--exclude-standard"], { cwd: ROOT, timeout: 60_000 })
    .toString()
    .split("\n")
    .filter(Boolean);

/** What each walkthrough prints when it worked, beyond its exit status (each checks its answers with jq -e). */
const EXPECTED: Record<(typeof SHELL_WALKTHROUGHS)[number], RegExp[]> = {
  "examples/quick-start-curl.sh": [/"username":\s*"admin"/, /"commonName":\s*"my-backend"/],
  "examples/quick-start-buf.sh": [/^tessera\.v1\.UserService\/Login$/m, /"commonName":\s*"my-backend"/],
  "examples/quick-start-cli.sh": [/\balice\b/, /cluster:read/],
  "examples/tokens.sh": [/"hint":\s*"tsr_pat_/],
  "examples/curl.sh": [/curl walkthrough done/],
  "examples/cli.sh": [/CLI walkthrough done/],
  "examples/admin-token.sh": [/"name":\s*"default"/],
  "examples/verify.sh": [/"code":\s*"VALID"/, /"credentialKind":\s*"pat"/],
  "examples/introspect.sh": [/"active":\s*true/, /"username":\s*"admin"/],
  "examples/oauth.sh": [/"access_token"|^"eyJ/m],
  "examples/audit.sh": [/TokenService\/RevokePersonalAccessToken/],
};

/**
 * The README walkthroughs as scripts (test/walkthroughs.ts lists them), run verbatim from the
 * checkout against one fresh server, one after the other and then again: their names must collide
 * neither between flows nor with an earlier run.
 */
describe("the README walkthroughs as scripts", () => {
  let ts: TestServer;
  let env: Record<string, string>;
  const SECRETS = join(ROOT, "examples", ".secrets");
  let before: Set<string>;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { admin: { token: ADMIN_TOKEN } });
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-examples-home-")),
      TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
      TESSERA_ADMIN_TOKEN: ADMIN_TOKEN,
      TESSERA_URL: `https://localhost:${ts.server.port}`,
      TESSERA_SERVER: `localhost:${ts.server.port}`,
      TESSERA_CA: join(ts.certs.dir, "ca.crt"),
      TESSERA_CERT_DIR: ts.certs.dir,
      TESSERA: `${process.execPath} ${BIN}`,
    };
    mkdirSync(SECRETS, { recursive: true, mode: 0o700 });
    before = new Set(readdirSync(SECRETS));
  });
  afterAll(async () => {
    await ts?.close();
    // What these runs kept (keys, tokens of a server that is gone) leaves with them.
    if (before)
      for (const name of readdirSync(SECRETS))
        if (!before.has(name)) rmSync(join(SECRETS, name), { recursive: true, force: true });
  });

  it("runs every walkthrough, then those that make unique names again, on one server; secrets and keys go under examples/.secrets/ only", async () => {
    const untrackedBefore = untracked();
    // The second round repeats the flows that make names the server keeps unique (tenants, machine
    // users in a tenant) or files that must not be overwritten (client keys).
    const again = SHELL_WALKTHROUGHS.filter(
      (w) => !/\/(quick-start-buf|tokens|admin-token|audit)\.sh$/.test(w),
    );
    for (const [round, scripts] of [SHELL_WALKTHROUGHS, again].entries())
      for (const script of scripts) {
        const r = await runScript(script, env);
        expect(r.code, `${script} (round ${round + 1})\n${r.stdout}\n${r.stderr}`).toBe(0);
        for (const pattern of EXPECTED[script]) expect(r.stdout, script).toMatch(pattern);
        // The secrets the flows create go to files, and the admin password or token never to output.
        expect(r.stdout + r.stderr, script).not.toContain(ADMIN_PASSWORD);
        expect(r.stdout + r.stderr, script).not.toContain(ADMIN_TOKEN);
      }
    // Nothing new in the working copy that git would pick up: no my-backend/, no mu.json.
    expect(untracked()).toEqual(untrackedBefore);
    const kept = readdirSync(SECRETS).filter((n) => !before.has(n));
    expect(
      kept.filter((n) => n.startsWith("quick-start-") && !n.startsWith("quick-start-cli-")),
    ).toHaveLength(3);
    const key = join(SECRETS, kept.find((n) => /^quick-start-\d/.test(n))!, "my-backend", "client.key");
    expect(statSync(key).mode & 0o777).toBe(0o600);
    const ignored = execFileSync("git", ["check-ignore", `examples/.secrets/${kept[0]}/x`], {
      cwd: ROOT,
      timeout: 60_000,
    });
    expect(ignored.toString().trim()).toBe(`examples/.secrets/${kept[0]}/x`);
  }, 1_800_000);

  it("stops at the first failure, a jq failure included (set -euo pipefail)", async () => {
    for (const script of SHELL_WALKTHROUGHS) {
      const r = await runScript(script, {
        ...env,
        TESSERA_ADMIN_PASSWORD: "not the password",
        TESSERA_ADMIN_TOKEN: "not-the-token-but-at-least-thirty-two-characters",
      });
      expect(r.code, script).not.toBe(0);
      // Nothing after the refused credential ran (buf lists the methods and admin-token.sh has one call before).
      if (script !== "examples/quick-start-buf.sh" && script !== "examples/admin-token.sh")
        expect(r.stdout, script).toBe("");
    }
  }, 600_000);
});

describe("the repository's license and changelog", () => {
  it("ships the Apache-2.0 text package.json claims, and a changelog with an Unreleased section", () => {
    const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { license: string };
    expect(pkg.license).toBe("Apache-2.0");
    const license = readFileSync(join(ROOT, "LICENSE"), "utf8");
    expect(license).toContain("Apache License");
    expect(license).toContain("Version 2.0, January 2004");
    expect(license).toContain("END OF TERMS AND CONDITIONS");
    expect(readFileSync(join(ROOT, "CHANGELOG.md"), "utf8")).toMatch(/^## \[Unreleased\]$/m);
  });
});
