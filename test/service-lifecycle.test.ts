import { type ChildProcess, execFile, spawn } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initORM } from "../src/storage/orm.js";
import { DATABASES, dropSchema, TEST_MASTER_KEY } from "./helpers.js";
import { scanChildStderr } from "./log-scan-suite.js";

const exec = promisify(execFile);
const ROOT = join(import.meta.dirname, "..");

/** A `tessera serve` process and what it has written to stderr so far. */
interface Served {
  child: ChildProcess;
  url: string;
  port: number;
  stderr: () => string;
  exited: Promise<number | null>;
}

const children = new Set<ChildProcess>();
afterAll(() => {
  for (const c of children) c.kill("SIGKILL");
});

/** Spawn a command that runs `tessera serve`; resolves once it logs that it listens. */
function serve(command: string, args: string[], env: Record<string, string>, cwd = ROOT): Promise<Served> {
  const child = spawn(command, args, { cwd, env: { ...(process.env as Record<string, string>), ...env } });
  children.add(child);
  scanChildStderr(child);
  let stderr = "";
  const exited = new Promise<number | null>((resolve) =>
    child.once("exit", (code) => {
      children.delete(child);
      resolve(code);
    }),
  );
  child.stdout!.resume();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line in 90 s:\n${stderr}`)), 90_000);
    child.stderr!.on("data", (d) => {
      stderr += d;
      const m = /"url":"(https:\/\/[^"]+)".*"msg":"tessera listening"/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolve({ child, url: m[1]!, port: Number(new URL(m[1]!).port), stderr: () => stderr, exited });
      }
    });
    void exited.then((code) => reject(new Error(`serve exited with ${code} before listening:\n${stderr}`)));
  });
}

/** Whether a TLS handshake with the port succeeds now. */
function accepts(port: number, ca: Buffer): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = tlsConnect({ host: "127.0.0.1", port, ca, servername: "localhost" }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** Wait until `check` holds, for up to `ms`. */
async function until(check: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return check();
}

/** The environment of a server of these tests: its own SQLite file and cert folder. */
function envIn(dir: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    TESSERA_DATABASE_URL: `sqlite:${join(dir, "tessera.db")}`,
    TESSERA_CERT_DIR: join(dir, "certs"),
    TESSERA_HOST: "127.0.0.1",
    TESSERA_PORT: "0",
    TESSERA_PASSWORD_ITERATIONS: "1000",
    TESSERA_ADMIN_PASSWORD: "lifecycle-admin-password",
    TESSERA_LOG_LEVEL: "",
    ...extra,
  };
}

const LOGIN_BODY = JSON.stringify({ username: "admin", password: "lifecycle-admin-password" });

/**
 * The build stage of deploy/Containerfile: what it copies into the image before `npm run build`
 * (`COPY <source>… <dest>` lines up to the second `FROM`), so a file the build needs and the
 * container does not copy fails here, not in an operator's image build.
 */
function containerBuildSources(): string[] {
  const file = readFileSync(join(ROOT, "deploy", "Containerfile"), "utf8");
  const build = file.split(/^FROM /m)[1]!;
  const sources: string[] = [];
  for (const m of build.matchAll(/^COPY (?!--from)(.+)$/gm))
    sources.push(...m[1]!.trim().split(/\s+/).slice(0, -1));
  return sources;
}

/**
 * The production start: the compiled JavaScript, built as deploy/Containerfile builds it
 * (its build stage's files copied into a temporary folder beside a link to node_modules,
 * then `npm run build`), run as `node dist/src/main.js serve`. Its signals are tested on
 * it: SIGHUP re-reads the log level, SIGTERM drains.
 */
describe("the production start from compiled JavaScript", () => {
  let build: string;
  beforeAll(async () => {
    build = mkdtempSync(join(tmpdir(), "tessera-dist-"));
    const sources = containerBuildSources();
    expect(sources).toEqual(expect.arrayContaining(["package.json", "src", "gen"]));
    for (const source of sources) cpSync(join(ROOT, source), join(build, source), { recursive: true });
    symlinkSync(join(ROOT, "node_modules"), join(build, "node_modules"));
    await exec("npm", ["run", "build"], { cwd: build, maxBuffer: 16 * 1024 * 1024 });
  }, 240_000);

  it.each(DATABASES)(
    "serves ($name), changes its log level on SIGHUP, and on SIGTERM finishes a call in flight, refuses new connections, cuts what outlives the grace period, flushes and exits 0",
    {
      timeout: 120_000,
    },
    async (db) => {
      const dir = mkdtempSync(join(tmpdir(), "tessera-prod-"));
      const url = db.name === "sqlite" ? `sqlite:${join(dir, "tessera.db")}` : db.url();
      const config = join(dir, "tessera.yaml");
      writeFileSync(config, "log:\n  level: info\n");
      const s = await serve(
        process.execPath,
        [join(build, "dist", "src", "main.js"), "serve", "--config", config],
        {
          ...envIn(dir),
          TESSERA_DATABASE_URL: url,
          ...(db.name === "postgres" ? { TESSERA_MASTER_KEY: TEST_MASTER_KEY } : {}),
          // Room, on a loaded machine, for what the call that finishes does within it after
          // the signal: connections tried until refused, then the rest of its body and a login.
          TESSERA_SHUTDOWN_GRACE_SECONDS: "6",
        },
      );
      const ca = readFileSync(join(dir, "certs", "ca.crt"));
      const reloads = () =>
        s
          .stderr()
          .split("\n")
          .filter((l) => l.includes('"msg":"TLS material reloaded"')).length;

      // SIGHUP at info: the reload is logged at info.
      s.child.kill("SIGHUP");
      expect(await until(() => reloads() === 1, 10_000)).toBe(true);
      // Raised to warn: the change is said, and info lines stop.
      writeFileSync(config, "log:\n  level: warn\n");
      s.child.kill("SIGHUP");
      expect(await until(() => s.stderr().includes('"from":"info","to":"warn"'), 10_000)).toBe(true);
      await new Promise((r) => setTimeout(r, 1000));
      expect(reloads()).toBe(1);
      // Lowered to debug: info lines again.
      writeFileSync(config, "log:\n  level: debug\n");
      s.child.kill("SIGHUP");
      expect(await until(() => s.stderr().includes('"from":"warn","to":"debug"'), 10_000)).toBe(true);
      expect(await until(() => reloads() === 2, 10_000)).toBe(true);
      // A configuration that no longer loads keeps the level, and says why.
      writeFileSync(config, "log:\n  level: loud\n");
      s.child.kill("SIGHUP");
      expect(await until(() => s.stderr().includes("configuration reload failed"), 10_000)).toBe(true);
      expect(await until(() => reloads() === 3, 10_000)).toBe(true);

      // Two calls in flight over one HTTP/2 connection: each has sent its headers and part of
      // its body. One finishes after SIGTERM, within the grace period; the other never does.
      const session = http2.connect(s.url, { ca, servername: "localhost" });
      session.on("error", () => undefined);
      const call = () => {
        const stream = session.request({
          ":method": "POST",
          ":path": "/tessera.v1.UserService/Login",
          "content-type": "application/json",
        });
        stream.write(LOGIN_BODY.slice(0, 10));
        const answer = new Promise<{ status: number | undefined; body: string; error?: string }>(
          (resolve) => {
            let status: number | undefined;
            let body = "";
            stream.on("response", (h) => (status = h[":status"] as number));
            stream.on("data", (d) => (body += d));
            stream.on("end", () => resolve({ status, body }));
            stream.on("error", (err) => resolve({ status, body, error: err.message }));
            stream.on("close", () => resolve({ status, body, error: "closed" }));
          },
        );
        return { stream, answer };
      };
      const finishing = call();
      const stalled = call();
      await new Promise((r) => setTimeout(r, 300));

      const signalled = performance.now();
      s.child.kill("SIGTERM");
      expect(await until(async () => !(await accepts(s.port, ca)), 5_000)).toBe(true);
      // The open call completes its request after the signal and is answered in full.
      finishing.stream.end(LOGIN_BODY.slice(10));
      const done = await finishing.answer;
      expect(done.status).toBe(200);
      expect(JSON.parse(done.body).accessToken).toMatch(/^ey/);
      // The stalled one is cut once the grace period (6 s) is over; the process then exits 0.
      const cut = await stalled.answer;
      expect(cut.status).toBeUndefined();
      expect(await s.exited).toBe(0);
      const took = performance.now() - signalled;
      expect(took).toBeGreaterThan(5_900);
      expect(took).toBeLessThan(18_000);
      session.destroy();
      expect(s.stderr()).toContain('"cut":1');
      expect(s.stderr()).toContain('"msg":"stopped"');

      // The audit event of the call finished during the drain reached the database before exit.
      const storage = await initORM({ url, migrate: false });
      try {
        const rows = await storage.em
          .getConnection()
          .execute("select count(*) as n from audit_events where action like '%Login%'");
        expect(Number(rows[0].n)).toBeGreaterThanOrEqual(1);
      } finally {
        await storage.close();
        await dropSchema(url);
      }
    },
  );
});

describe("npm start", () => {
  it("runs the server in its own process: SIGTERM to npm's PID ends the server", {
    timeout: 120_000,
  }, async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-npmstart-"));
    mkdirSync(join(dir, "home"));
    const s = await serve("npm", ["start", "--silent"], envIn(dir));
    const ca = readFileSync(join(dir, "certs", "ca.crt"));
    expect(await accepts(s.port, ca)).toBe(true);
    // The PID a process manager or a shell holds is npm's.
    s.child.kill("SIGTERM");
    expect(await until(async () => !(await accepts(s.port, ca)), 15_000)).toBe(true);
    expect(await s.exited).not.toBeNull();
    expect(s.stderr()).toContain('"msg":"stopped"');
  });
});
