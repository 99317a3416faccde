import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
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
