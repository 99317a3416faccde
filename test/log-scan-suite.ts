import type { ChildProcess } from "node:child_process";
import { appendFileSync, mkdirSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { type DestinationStream, pino } from "pino";

/**
 * The folder the whole suite's logs are written to for the scan (`TESSERA_TEST_LOG_SCAN`),
 * or undefined when the run does not scan. Every log a test makes goes there: the test
 * apps' default logger (silentLogger, test/helpers.ts), a logger a test gives an app of its
 * own ({@link scannedSink}), and the stderr of the processes tests spawn
 * ({@link scanChildStderr}): those are where a database fault's SQL would show.
 */
export const LOG_SCAN_DIR = process.env.TESSERA_TEST_LOG_SCAN || undefined;

let destination: DestinationStream | undefined;

/** This process's scan file (one per worker), opened on first use; undefined when the run does not scan. */
export function scanDestination(): DestinationStream | undefined {
  if (!LOG_SCAN_DIR) return undefined;
  destination ??= pino.destination({
    dest: join(LOG_SCAN_DIR, `${process.pid}.log`),
    sync: true,
    mkdir: true,
  });
  return destination;
}

/**
 * The sink of a logger a test made for itself (to read its lines), teed into the scan file
 * when the run scans: what the test sees is also scanned. `sink` unchanged otherwise.
 */
export function scannedSink<S extends { write(line: string): unknown }>(
  sink: S,
): S | { write(line: string): void } {
  const scan = scanDestination();
  if (!scan) return sink;
  return {
    write(line: string) {
      scan.write(line);
      sink.write(line);
    },
  };
}

/**
 * Keep what a spawned process (a `tessera serve`, a CLI run) writes to stderr in the scan
 * folder, one file per process, as it is written (a process killed later has left its
 * lines already). `dir`: another folder (the scanner's own test).
 */
export function scanChildStderr(child: ChildProcess, dir = LOG_SCAN_DIR): void {
  if (!dir || !child.stderr) return;
  const file = join(dir, `child-${process.pid}-${child.pid}.log`);
  child.stderr.on("data", (d: Buffer | string) => appendFileSync(file, d));
}

/**
 * The scan of the whole suite's logs (see LOG_SCAN_DIR in test/helpers.ts): secrets are
 * recognised by their format, since the tests that made them are gone by then. A PBKDF2
 * hash in any form, a token with one of Tessera's prefixes followed by its secret part (a
 * hint, `tsr_pat_…abcd`, is not one), a JWT, a refresh token's SHA-256 (64 hex digits
 * labelled as such), a private key, the test passwords.
 */
export const SECRET_PATTERNS: [string, RegExp][] = [
  ["a PBKDF2 hash", /pbkdf2-sha256\$/],
  ["a token or key", /\btsr_(?:pat|key|mu|rt)_[A-Za-z0-9_-]{16,}/],
  ["a JWT", /\beyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]{20,}/],
  // A Basic pair as an Authorization header or a VerifyCredential `credential` carries it.
  ["a Basic credential", /\bBasic [A-Za-z0-9+/]{16,}={0,2}/],
  ["a private key", /-----BEGIN [A-Z ]*PRIVATE KEY-----|"d":"[\w-]{32,}"/],
  ["the test admin password", /admin-password-for-tests/],
  // The passwords the shared fixtures create users with (test/machine-fixtures.ts and others).
  ["a test user's password", /tenant admin password|a good long password/],
  // TEST_MASTER_KEY of test/helpers.ts (32 bytes of 7, base64), the key-encryption key.
  ["the test master key", new RegExp(Buffer.alloc(32, 7).toString("base64").replace(/[+/=]/g, "\\$&"))],
];

/** Empty the folder before the run. */
export function prepareLogScan(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true, mode: 0o700 });
}

/** Fail (with what was found where, never the value itself) when a log line of the run holds a secret. */
export function scanSuiteLogs(dir: string): void {
  const problems: string[] = [];
  let lines = 0;
  for (const file of readdirSync(dir)) {
    const text = readFileSync(join(dir, file), "utf8");
    text.split("\n").forEach((line, i) => {
      if (line) lines++;
      for (const [what, re] of SECRET_PATTERNS) if (re.test(line)) problems.push(`${file}:${i + 1}: ${what}`);
    });
  }
  if (lines === 0) throw new Error(`the log scan found no log lines in ${dir}: nothing was captured`);
  if (problems.length > 0)
    throw new Error(`secrets in the logs of the test suite:\n  ${problems.slice(0, 50).join("\n  ")}`);
}
