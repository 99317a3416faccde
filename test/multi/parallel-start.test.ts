import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, describe, expect, it } from "vitest";
import { initORM } from "../../src/storage/orm.js";
import { dropSchema, POSTGRES, TEST_MASTER_KEY } from "../helpers.js";
import { scanChildStderr } from "../log-scan-suite.js";
import { killAll, MAIN, ROOT, serve, stop } from "./processes.js";

const INSTANCES = 3;

/** Environment of a `tessera` process of these tests: its database and certificate folder, fast-ish hashing. */
function envFor(url: string, certDir: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    ...(process.env as Record<string, string>),
    TESSERA_DATABASE_URL: url,
    TESSERA_CERT_DIR: certDir,
    TESSERA_HOST: "127.0.0.1",
    TESSERA_PORT: "0",
    TESSERA_ADMIN_PASSWORD: "parallel-start-admin-password",
    // Enough PBKDF2 work for the bootstrap's check-then-insert window to matter.
    TESSERA_PASSWORD_ITERATIONS: "100000",
    ...(url.startsWith("postgres") ? { TESSERA_MASTER_KEY: TEST_MASTER_KEY } : {}),
    ...extra,
  };
}

interface Exited {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Run a `tessera` command to its end. */
function run(args: string[], env: Record<string, string>): Promise<Exited> {
  const started = performance.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--import", "tsx", MAIN, ...args], { cwd: ROOT, env });
    scanChildStderr(child);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    child.on("close", (code) => resolve({ code, stdout, stderr, ms: performance.now() - started }));
  });
}

afterAll(() => {
  killAll();
});

/** What the instances made in the database: admins, default tenants, active signing keys. */
async function countBootstrap(url: string): Promise<{ admins: number; tenants: number; activeKeys: number }> {
  const storage = await initORM({ url, migrate: false });
  try {
    const conn = storage.em.getConnection();
    const one = async (sql: string) => Number((await conn.execute(sql))[0].n);
    return {
      admins: await one("select count(*) as n from users where username = 'admin'"),
      tenants: await one("select count(*) as n from tenants where name = 'default'"),
      activeKeys: await one("select count(*) as n from signing_keys where retired_at is null"),
    };
  } finally {
    await storage.close();
  }
}

/** Three instances started at the same moment on one database and one certificate folder. */
async function startTogether(url: string) {
  const certDir = join(mkdtempSync(join(tmpdir(), "tessera-par-")), "certs");
  const results = await Promise.allSettled(
    Array.from({ length: INSTANCES }, () => serve(envFor(url, certDir))),
  );
  const failed = results.filter((r) => r.status === "rejected").map((r) => String(r.reason));
  const up = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  try {
    expect(failed).toEqual([]);
    // One CA: each instance's certificate verifies under the folder's ca.crt.
    const dispatcher = new Agent({ connect: { ca: readFileSync(join(certDir, "ca.crt")) } });
    const jwks = await Promise.all(
      up.map(async ({ url: base }) =>
        (await undiciFetch(`${base}/.well-known/jwks.json`, { dispatcher })).json(),
      ),
    );
    await dispatcher.close();
    expect(new Set(jwks.map((j) => JSON.stringify(j))).size).toBe(1);
    expect((jwks[0] as { keys: unknown[] }).keys).toHaveLength(1);
    expect(await countBootstrap(url)).toEqual({ admins: 1, tenants: 1, activeKeys: 1 });
  } finally {
    await Promise.all(up.map(({ child }) => stop(child)));
  }
}

describe("instances started together on one PostgreSQL schema", () => {
  const urls: string[] = [];
  afterAll(async () => {
    for (const url of urls) await dropSchema(url);
  });

  it.each([1, 2, 3])(
    "all listen with one admin, one tenant, one active key and one JWKS (round %i)",
    async () => {
      const url = POSTGRES.url();
      urls.push(url);
      await startTogether(url);
    },
  );

  it("lets three `tessera migrate` at once all succeed, one of them applying", async () => {
    const url = POSTGRES.url();
    urls.push(url);
    const env = envFor(url, join(tmpdir(), "unused-certs"));
    const runs = await Promise.all(Array.from({ length: INSTANCES }, () => run(["migrate"], env)));
    expect(
      runs.map((r) => r.code),
      runs.map((r) => r.stderr).join("\n"),
    ).toEqual([0, 0, 0]);
    expect(runs.filter((r) => r.stdout.includes("applied:"))).toHaveLength(1);
    expect(runs.filter((r) => r.stdout.includes("up to date"))).toHaveLength(INSTANCES - 1);
  });
});

describe("instances started together on one SQLite file", () => {
  it("all listen with one admin, one tenant, one active key and one JWKS", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-par-sqlite-"));
    await startTogether(`sqlite:${join(dir, "tessera.db")}`);
  });

  it("lets three `tessera migrate` at once all succeed, one of them applying", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-par-sqlite-"));
    const env = envFor(`sqlite:${join(dir, "tessera.db")}`, join(dir, "certs"));
    const runs = await Promise.all(Array.from({ length: INSTANCES }, () => run(["migrate"], env)));
    expect(
      runs.map((r) => r.code),
      runs.map((r) => r.stderr).join("\n"),
    ).toEqual([0, 0, 0]);
    expect(runs.filter((r) => r.stdout.includes("applied:"))).toHaveLength(1);
  });
});

describe("a start that fails", () => {
  let busy: Server | undefined;
  afterAll(() => busy?.close());

  /** The lines a failed start printed that say what failed. */
  const errorLines = (r: Exited) => r.stderr.split("\n").filter((l) => l.startsWith("error:"));

  it("exits non-zero at once with one clear line when the port is in use, creating nothing", async () => {
    busy = createServer();
    await new Promise<void>((r) => busy!.listen(0, "127.0.0.1", r));
    const port = (busy.address() as { port: number }).port;
    const dir = mkdtempSync(join(tmpdir(), "tessera-busy-"));
    const db = join(dir, "tessera.db");
    const env = envFor(`sqlite:${db}`, join(dir, "certs"), { TESSERA_PORT: String(port) });
    // The cost of starting Node with tsx and loading the CLI, which the failure cannot avoid.
    const baseline = await run(["--version"], env);
    const r = await run(["serve"], env);
    expect(r.code).not.toBe(0);
    expect(r.code).not.toBeNull();
    // At once: no wait, retry or hang on top of loading the program. `serve` compiles and
    // loads the whole server through tsx where `--version` loads the command line only:
    // about 1.5–2.3× its time, which on a loaded machine (3 s for `--version` at load 18)
    // is seconds, so the bound scales with the baseline (a fixed 2 s over it failed there).
    // A wait of its own (a retry, a timeout) or a process that does not exit still fails.
    expect(r.ms, `serve ${r.ms.toFixed(0)} ms, --version ${baseline.ms.toFixed(0)} ms`).toBeLessThan(
      3 * baseline.ms + 2000,
    );
    expect(errorLines(r)).toEqual([`error: cannot listen on 127.0.0.1:${port}: address already in use`]);
    // Nothing was created: no database (so no admin), no certificates.
    expect(existsSync(db)).toBe(false);
    expect(existsSync(join(dir, "certs"))).toBe(false);
  });

  it("exits non-zero with one clear line on a bad certificate, before creating the admin", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-badcert-"));
    const certDir = join(dir, "certs");
    const ok = await run(["certs", "--cert-dir", certDir], envFor("sqlite::memory:", certDir));
    expect(ok.code).toBe(0);
    writeFileSync(
      join(certDir, "server.crt"),
      "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    );
    const db = join(dir, "tessera.db");
    const r = await run(["serve"], envFor(`sqlite:${db}`, certDir));
    expect(r.code).not.toBe(0);
    expect(errorLines(r)).toHaveLength(1);
    expect(errorLines(r)[0]).toContain(`bad TLS material in ${certDir}`);
    expect(existsSync(db)).toBe(false);
  });

  it("exits non-zero with one clear line when the database cannot be reached", async () => {
    const closed = createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const port = (closed.address() as { port: number }).port;
    await new Promise((r) => closed.close(r));
    const dir = mkdtempSync(join(tmpdir(), "tessera-nodb-"));
    const r = await run(["serve"], envFor(`postgres://postgres@127.0.0.1:${port}/test`, join(dir, "certs")));
    expect(r.code).not.toBe(0);
    expect(r.code).not.toBeNull();
    expect(errorLines(r)).toHaveLength(1);
    expect(errorLines(r)[0]).toContain("error: cannot reach the database: connect ECONNREFUSED");
    // Nothing written: the development certificates are made only once the database answers.
    expect(existsSync(join(dir, "certs"))).toBe(false);
  });

  it("exits non-zero with one clear line when a migration fails, and does not hang", async () => {
    const url = POSTGRES.url();
    const storage = await initORM({ url, migrate: false });
    // A table in the way of the first migration.
    await storage.em.getConnection().execute("create table tenants (unrelated int)");
    await storage.close();
    try {
      const dir = mkdtempSync(join(tmpdir(), "tessera-badmig-"));
      const r = await run(["serve"], envFor(url, join(dir, "certs")));
      expect(r.code).not.toBe(0);
      expect(r.code).not.toBeNull();
      expect(errorLines(r)).toHaveLength(1);
      expect(errorLines(r)[0]).toMatch(/tenants/);
      // Nothing created past the failure: no certificates, no users table (so no admin).
      expect(existsSync(join(dir, "certs"))).toBe(false);
      const after = await initORM({ url, migrate: false });
      try {
        const tables = await after.em
          .getConnection()
          .execute(
            `select table_name from information_schema.tables where table_schema = '${url.split("schema=")[1]}'`,
          );
        expect(tables.map((t) => String(t.table_name))).not.toContain("users");
      } finally {
        await after.close();
      }
    } finally {
      await dropSchema(url);
    }
  });
});
