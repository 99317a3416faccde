import { initORM } from "../src/storage/orm.js";
import { prepareLogScan, scanSuiteLogs } from "./log-scan-suite.js";

/**
 * PostgreSQL is part of the test matrix, never optional in CI: a missing server fails
 * the run here, before any test, with a message saying so. Locally a developer may set
 * TESSERA_TEST_SKIP_POSTGRES=1 to run the SQLite half only (refused when CI is set).
 */
export default async function setup(): Promise<(() => void) | undefined> {
  // Every project (unit, multi) inherits this file, and Vitest calls it once per project in
  // one process: the checks and the log scan's set-up and teardown are done by the first.
  if (process.env.TESSERA_TEST_GLOBAL_SETUP === "done") return undefined;
  process.env.TESSERA_TEST_GLOBAL_SETUP = "done";
  // With TESSERA_TEST_LOG_SCAN=<folder>, the logs of every test app are scanned for secrets at the end.
  const scanDir = process.env.TESSERA_TEST_LOG_SCAN;
  if (scanDir) prepareLogScan(scanDir);
  const teardown = scanDir
    ? () => {
        try {
          scanSuiteLogs(scanDir);
        } catch (err) {
          // Vitest reports an error thrown in teardown but exits 0: make the run fail.
          process.exitCode = 1;
          throw err;
        }
      }
    : undefined;
  if (process.env.TESSERA_TEST_SKIP_POSTGRES === "1") {
    if (process.env.CI)
      throw new Error("TESSERA_TEST_SKIP_POSTGRES is not allowed in CI: PostgreSQL tests must run");
    return teardown;
  }
  const url = process.env.TESSERA_TEST_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/test";
  let storage: Awaited<ReturnType<typeof initORM>> | undefined;
  try {
    storage = await initORM({ url, migrate: false });
    if (!(await storage.ping())) throw new Error("ping failed");
  } catch (err) {
    throw new Error(`PostgreSQL is required for the test suite at ${url}: ${(err as Error).message}`);
  } finally {
    await storage?.close();
  }
  return teardown;
}
