import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "bin", "tessera.js");

/** Run an examples/ script as a user would (bash, its own environment), collecting its output. */
function runScript(
  script: string,
  env: Record<string, string>,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(
      "bash",
      [join(ROOT, "examples", script)],
      { cwd: ROOT, env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...env }, timeout: 600_000 },
      (err, stdout, stderr) => {
        if (err && typeof (err as { code?: unknown }).code !== "number")
          return reject(new Error(`${script}: ${err.message}\n${stdout}\n${stderr}`));
        resolve({ code: err ? (err as unknown as { code: number }).code : 0, stdout, stderr });
      },
    );
  });
}

/**
 * The README walkthroughs as scripts (examples/curl.sh, examples/cli.sh), run verbatim
 * against a fresh server, one after the other and twice: their names must not collide.
 */
describe("the README walkthroughs as scripts", () => {
  let ts: TestServer;
  let env: Record<string, string>;

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-examples-home-")),
      TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
      TESSERA_URL: `https://localhost:${ts.server.port}`,
      TESSERA_SERVER: `localhost:${ts.server.port}`,
      TESSERA_CA: join(ts.certs.dir, "ca.crt"),
      TESSERA_CERT_DIR: ts.certs.dir,
      TESSERA: `${process.execPath} ${BIN}`,
    };
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("runs the curl walkthrough twice, then the CLI walkthrough, on one server", async () => {
    for (const script of ["curl.sh", "curl.sh", "cli.sh"]) {
      const r = await runScript(script, env);
      expect(r.code, `${script}\n${r.stdout}\n${r.stderr}`).toBe(0);
      expect(r.stdout).toMatch(/walkthrough done/);
      // The secrets the flows print go to files, and the admin password never to output.
      expect(r.stdout + r.stderr).not.toContain(ADMIN_PASSWORD);
    }
  }, 900_000);

  it("stops at the first failure, a jq failure included (set -euo pipefail)", async () => {
    const r = await runScript("cli.sh", { ...env, TESSERA_ADMIN_PASSWORD: "not the password" });
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toMatch(/walkthrough done/);
    const c = await runScript("curl.sh", { ...env, TESSERA_ADMIN_PASSWORD: "not the password" });
    expect(c.code).not.toBe(0);
    expect(c.stdout).not.toMatch(/walkthrough done/);
  }, 120_000);

  it("is what the README shows: each script's commands appear there verbatim", () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    for (const script of ["curl.sh", "cli.sh"]) {
      const text = readFileSync(join(ROOT, "examples", script), "utf8");
      const commands = text.slice(text.indexOf("set -euo pipefail")).trimEnd();
      expect(readme, script).toContain(commands);
    }
  });

  it("is what the README shows for the SDK and grpc-js walkthroughs: each script after its header comment, verbatim", () => {
    // test/sdk-package.test.ts runs these against a server, from a project with the packed SDK.
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    for (const script of ["sdk-esm/walkthrough.mjs", "sdk-cjs/walkthrough.cjs", "grpc-js/walkthrough.cjs"]) {
      const lines = readFileSync(join(ROOT, "examples", script), "utf8").split("\n");
      const body = lines
        .slice(lines.findIndex((l) => !l.startsWith("//")))
        .join("\n")
        .trimEnd();
      expect(body.length, script).toBeGreaterThan(500);
      expect(readme, script).toContain(`\`\`\`js\n${body}\n\`\`\``);
    }
  });

  it("is what the README shows for the Python walkthrough: the script after its header comment, verbatim", () => {
    // test/sdk-package.test.ts runs it against a server, beside the descriptor set the packed SDK ships.
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const lines = readFileSync(join(ROOT, "examples", "python", "walkthrough.py"), "utf8").split("\n");
    const body = lines
      .slice(lines.findIndex((l) => !l.startsWith("#")))
      .join("\n")
      .trimEnd();
    expect(body).toMatch(/^import os\n/);
    expect(readme).toContain(`\`\`\`python\n${body}\n\`\`\``);
  });

  it("writes its secrets under examples/.secrets/, which git ignores", () => {
    const dir = join(ROOT, "examples", ".secrets");
    expect(readdirSync(dir).length).toBeGreaterThan(0);
    const ignored = execFileSync("git", ["check-ignore", "examples/.secrets/x/mu.json"], { cwd: ROOT })
      .toString()
      .trim();
    expect(ignored).toBe("examples/.secrets/x/mu.json");
  });
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
