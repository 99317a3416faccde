import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, describe, expect, it } from "vitest";
import { closedPort } from "./cli-helpers.js";
import { scanChildStderr } from "./log-scan-suite.js";

const ROOT = join(import.meta.dirname, "..");
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const MAIN = join(ROOT, "src", "main.ts");

function run(args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}) {
  return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(TSX, [MAIN, ...args], {
      cwd: opts.cwd ?? ROOT,
      env: { ...process.env, ...opts.env },
    });
    scanChildStderr(child);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

describe("server commands", () => {
  const children: ChildProcess[] = [];
  afterAll(() => {
    for (const c of children) c.kill("SIGKILL");
  });

  it("documents every server command in --help", async () => {
    const top = await run(["--help"]);
    expect(top.code).toBe(0);
    for (const cmd of ["serve", "migrate", "init", "certs"]) expect(top.stdout).toContain(cmd);
    expect(top.stdout).toContain("Exit codes");
    for (const cmd of ["serve", "migrate", "init", "certs"]) {
      const help = await run([cmd, "--help"]);
      expect(help.code, cmd).toBe(0);
      expect(help.stdout).toContain("Usage:");
    }
  });

  it("exits with 2 on a usage error and on an invalid configuration", async () => {
    expect((await run(["no-such-command"])).code).toBe(2);
    const bad = await run(["migrate"], { env: { TESSERA_MTLS: "sometimes" } });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain("TESSERA_MTLS");
    // One `error: …` line first, like every other refused start.
    expect(bad.stderr).toMatch(/^error: invalid configuration/);
    // A config file that is not YAML is a bad configuration too, told by its position only:
    // the parser's own message quotes the line, here the admin password.
    const file = join(mkdtempSync(join(tmpdir(), "tessera-cli-")), "tessera.yaml");
    writeFileSync(file, "admin:\n  password: pw-in-broken-yaml: x\n");
    const broken = await run(["migrate", "--config", file]);
    expect(broken.code).toBe(2);
    expect(broken.stderr).toMatch(/^error: config file .* not valid YAML \(line 2, column/);
    expect(broken.stderr).not.toContain("pw-in-broken-yaml");
  });

  it("warns that a password in --database is readable in the process list, without printing it", async () => {
    const port = await closedPort();
    const withPassword = await run(
      ["migrate", "--database", `postgres://tessera:pw-in-argv@127.0.0.1:${port}/x`],
      {
        env: { TESSERA_MASTER_KEY: Buffer.alloc(32, 7).toString("base64") },
      },
    );
    expect(withPassword.stderr).toContain("warning: --database holds a password");
    expect(withPassword.stderr).toContain("TESSERA_DATABASE_URL");
    expect(withPassword.stderr + withPassword.stdout).not.toContain("pw-in-argv");
    const dir = mkdtempSync(join(tmpdir(), "tessera-cli-"));
    const without = await run(["migrate", "--database", `sqlite:${join(dir, "t.db")}`], {
      env: { TESSERA_PASSWORD_ITERATIONS: "1000" },
    });
    expect(without.code).toBe(0);
    expect(without.stderr).not.toContain("warning: --database");
  });

  it("migrates, bootstraps an admin once, and creates certificates with a private CA key", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-cli-"));
    const env = { TESSERA_DATABASE_URL: `sqlite:${join(dir, "t.db")}`, TESSERA_PASSWORD_ITERATIONS: "1000" };
    const migrate = await run(["migrate"], { env });
    expect(migrate.code).toBe(0);
    expect(migrate.stdout).toContain("Migration20261123000000_foundation");
    expect((await run(["migrate"], { env })).stdout).toContain("up to date");
    const init = await run(["init"], { env });
    expect(init.stdout).toMatch(/Created admin user "admin" with password: \S{20,}/);
    expect((await run(["init"], { env })).stdout).toContain("already exists");
    const certs = await run(["certs", "--cert-dir", join(dir, "certs")]);
    expect(certs.code).toBe(0);
    for (const f of ["ca.crt", "ca.key", "server.crt", "server.key"])
      expect(existsSync(join(dir, "certs", f))).toBe(true);
    expect(statSync(join(dir, "certs", "ca.key")).mode & 0o777).toBe(0o600);
    const client = await run([
      "certs",
      "client",
      "backend-1",
      "--cert-dir",
      join(dir, "certs"),
      "--out",
      join(dir, "b1"),
      "--san-uri",
      "spiffe://default/backend-1",
    ]);
    expect(client.code).toBe(0);
    expect(client.stdout).toMatch(/sha256 fingerprint: [0-9a-f]{64}/);
    expect(readFileSync(join(dir, "b1", "ca.crt"), "utf8")).toBe(
      readFileSync(join(dir, "certs", "ca.crt"), "utf8"),
    );
    // Seven CLI processes in a row, each starting tsx: over a minute when the suite's other files load the machine.
  }, 120_000);

  it("shows the generated admin password of a start that fails after making the admin, so that the admin stays usable", async () => {
    // The admin is committed before the first signing key is made: a start that failed there
    // (here the database refuses that key, as a full disk would) printed nothing, and every
    // later start found the admin made, with a password nobody had seen.
    const dir = mkdtempSync(join(tmpdir(), "tessera-cli-"));
    const url = `sqlite:${join(dir, "t.db")}`;
    const env = {
      TESSERA_DATABASE_URL: url,
      TESSERA_PASSWORD_ITERATIONS: "1000",
      TESSERA_METRICS_LISTEN: "off",
    };
    expect((await run(["migrate"], { env })).code).toBe(0);
    const { initORM } = await import("../src/storage/orm.js");
    const sql = async (text: string) => {
      const storage = await initORM({ url, migrate: false });
      try {
        return (await storage.em.getConnection().execute(text)) as Record<string, string>[];
      } finally {
        await storage.close();
      }
    };
    await sql(
      "create trigger refuse_keys before insert on signing_keys begin select raise(abort, 'no room for a key'); end",
    );
    const failed = await run(["serve", "--insecure-plaintext", "--port", "0", "--host", "127.0.0.1"], {
      env,
    });
    expect(failed.code).not.toBe(0);
    expect(failed.stderr).toContain("SQLITE_CONSTRAINT_TRIGGER");
    const shown = /Created admin user "admin" with password: (\S{20,})/.exec(failed.stdout)?.[1];
    expect(shown, failed.stdout).toBeDefined();
    // The start after the fault finds the admin made (and prints no password): the one shown opens it.
    await sql("drop trigger refuse_keys");
    const [admin] = await sql("select password_hash from users where username = 'admin'");
    const { verifySecret } = await import("../src/auth/password.js");
    expect(await verifySecret(shown!, admin!.password_hash!)).toBe(true);
    const again = await run(["init"], { env });
    expect(again.stdout).toContain("already exists");
  }, 120_000);

  it("warns at start when it serves without TLS on an address other hosts can reach, and not on loopback", async () => {
    const serve = async (host: string) => {
      const cwd = mkdtempSync(join(tmpdir(), "tessera-plaintext-"));
      const child = spawn(TSX, [MAIN, "serve", "--insecure-plaintext", "--port", "0", "--host", host], {
        cwd,
        env: { ...process.env, TESSERA_PASSWORD_ITERATIONS: "1000", TESSERA_METRICS_LISTEN: "off" },
      });
      scanChildStderr(child);
      children.push(child);
      let stderr = "";
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`server did not start: ${stderr}`)), 60_000);
        child.stderr.on("data", (d) => {
          stderr += d;
          if (stderr.includes('"msg":"tessera listening"')) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
      // The warning follows the listening line in the same turn; let it land.
      await new Promise((r) => setTimeout(r, 300));
      child.kill("SIGTERM");
      await new Promise((r) => child.once("close", r));
      return stderr;
    };
    const wide = await serve("0.0.0.0");
    expect(wide).toContain("serving without TLS on an address other hosts can reach");
    // The listening line names what is bound, not only the loopback URL to dial it at.
    expect(wide).toMatch(/"listen":"0\.0\.0\.0:\d+".*"msg":"tessera listening"/);
    const loopback = await serve("127.0.0.1");
    expect(loopback).not.toContain("serving without TLS");
    expect(loopback).toMatch(/"listen":"127\.0\.0\.1:\d+".*"msg":"tessera listening"/);
  }, 120_000);

  it("starts like the README's quick start: certificates, database and admin from nothing, then serves /health over TLS", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "tessera-quickstart-"));
    const child = spawn(TSX, [MAIN, "serve"], {
      cwd,
      env: {
        ...process.env,
        TESSERA_PORT: "0",
        TESSERA_HOST: "127.0.0.1",
        TESSERA_PASSWORD_ITERATIONS: "1000",
      },
    });
    scanChildStderr(child);
    children.push(child);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`server did not start: ${stderr}`)), 60_000);
      child.stderr.on("data", (d) => {
        stderr += d;
        const m = /"url":"(https:\/\/[^"]+)"/.exec(stderr);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!);
        }
      });
    });
    const agent = new Agent({ connect: { ca: readFileSync(join(cwd, "certs", "ca.crt")) } });
    try {
      const res = await undiciFetch(`${url}/health`, { dispatcher: agent });
      expect(res.status).toBe(200);
      expect(existsSync(join(cwd, "data", "tessera.db"))).toBe(true);
      const password = /with password: (\S+)/.exec(stdout)?.[1];
      expect(password).toBeTruthy();
      expect(stderr).not.toContain(password!);
      const login = await undiciFetch(`${url}/tessera.v1.UserService/Login`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ username: "admin", password }),
        dispatcher: agent,
      });
      expect(login.status).toBe(200);
    } finally {
      await agent.close();
      child.kill("SIGTERM");
      await new Promise((r) => child.once("close", r));
    }
  });
});
