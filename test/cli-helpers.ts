import { execFile } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import { scanChildStderr } from "./log-scan-suite.js";

const BIN = fileURLToPath(new URL("../bin/tessera.js", import.meta.url));

/** The outcome of one `tessera` run. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Run `node bin/tessera.js ...args` as a subprocess with only the given environment
 * (plus PATH), feeding `input` on stdin; `maxBuffer` bounds what each of its outputs may hold.
 */
export function runCli(
  args: string[],
  env: Record<string, string>,
  input = "",
  maxBuffer = 1024 * 1024,
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      process.execPath,
      [BIN, ...args],
      { env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...env }, timeout: 60_000, maxBuffer },
      (err, stdout, stderr) => {
        if (err && typeof (err as { code?: unknown }).code !== "number") return reject(err);
        resolve({ code: err ? (err as unknown as { code: number }).code : 0, stdout, stderr });
      },
    );
    // Its stderr only: stdout is where the CLI shows a created token, once, by design.
    scanChildStderr(child);
    child.stdin!.end(input);
  });
}

/** A TCP port that was free a moment ago (nobody listens on it). */
export async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
