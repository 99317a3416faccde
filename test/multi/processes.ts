import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
import { ADMIN_PASSWORD, TEST_MASTER_KEY } from "../helpers.js";
import { scanChildStderr } from "../log-scan-suite.js";

/** The repository root and the CLI's entry point, run through tsx as `npm start` does. */
export const ROOT = join(import.meta.dirname, "..", "..");
export const MAIN = join(ROOT, "src", "main.ts");

const children = new Set<ChildProcess>();

/**
 * Start `tessera serve` as a process of its own; resolves with its URL (and its metrics
 * endpoint's, when it serves one) once it listens, rejects with its output if it ends first.
 */
export function serve(
  env: Record<string, string>,
): Promise<{ url: string; child: ChildProcess; metricsUrl?: string }> {
  const child = spawn(process.execPath, ["--import", "tsx", MAIN, "serve"], { cwd: ROOT, env });
  children.add(child);
  scanChildStderr(child);
  child.once("exit", () => children.delete(child));
  return new Promise((resolve, reject) => {
    let stderr = "";
    child.stdout.resume();
    child.stderr.on("data", (d) => {
      stderr += d;
      const m = /"url":"(https:\/\/[^"]+)".*"msg":"tessera listening"/.exec(stderr);
      if (m) {
        const metrics = /"url":"(http:\/\/[^"]+\/metrics)".*"msg":"metrics listening"/.exec(stderr);
        resolve({ url: m[1]!, child, ...(metrics ? { metricsUrl: metrics[1]! } : {}) });
      }
    });
    child.once("exit", (code) => reject(new Error(`serve exited with ${code} before listening:\n${stderr}`)));
  });
}

/**
 * The environment of a `tessera serve` on `databaseUrl` with the test certificates, the test
 * admin password and master key, fast hashing and no rate or connection limits; `extra` is
 * spread last.
 */
export function serveEnv(
  databaseUrl: string,
  certDir: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return {
    ...(process.env as Record<string, string>),
    TESSERA_DATABASE_URL: databaseUrl,
    TESSERA_CERT_DIR: certDir,
    TESSERA_HOST: "127.0.0.1",
    TESSERA_PORT: "0",
    TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
    TESSERA_PASSWORD_ITERATIONS: "1000",
    TESSERA_MASTER_KEY: TEST_MASTER_KEY,
    TESSERA_RATE_LIMIT: "false",
    TESSERA_MAX_CONNECTIONS_PER_IP: "0",
    ...extra,
  };
}

/** SIGTERM a server and wait for it to exit. */
export async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  await exited;
}

/** SIGKILL every server {@link serve} started that is still running (afterAll). */
export function killAll(): void {
  for (const c of children) c.kill("SIGKILL");
}
