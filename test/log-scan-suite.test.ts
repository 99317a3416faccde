import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { scanChildStderr, scanSuiteLogs } from "./log-scan-suite.js";

/** Run `node -e script` with its stderr kept for the scan in `dir`; resolves when it has ended. */
function run(script: string, dir: string): Promise<void> {
  const child = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "ignore", "pipe"] });
  scanChildStderr(child, dir);
  return new Promise((resolve) => child.once("close", () => resolve()));
}

/**
 * The whole-suite scan (TESSERA_TEST_LOG_SCAN) sees what spawned processes write: a secret
 * planted in a child's stderr is flagged. In a folder of its own, so that the suite's own
 * scan is not failed by the plant.
 */
describe("the suite's log scan", () => {
  it("flags a token a spawned process wrote to stderr, naming the file and line, not the value", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-scan-"));
    const secret = `tsr_pat_${randomBytes(18).toString("base64url")}`;
    await run(
      `process.stderr.write(JSON.stringify({level:30,msg:"starting"})+"\\n"+JSON.stringify({level:50,msg:"query failed",sql:"insert ... values ('${secret}')"})+"\\n")`,
      dir,
    );
    expect(readdirSync(dir)).toEqual([expect.stringMatching(/^child-\d+-\d+\.log$/)]);
    let error: Error | undefined;
    try {
      scanSuiteLogs(dir);
    } catch (err) {
      error = err as Error;
    }
    expect(error?.message).toMatch(/child-\d+-\d+\.log:2: a token or key/);
    expect(error?.message).not.toContain(secret);
  });

  it("passes a spawned process whose stderr holds no secret (a token's hint is not one)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-scan-"));
    await run(
      `process.stderr.write(JSON.stringify({level:30,msg:"revoked",hint:"tsr_pat_…abcd"})+"\\n")`,
      dir,
    );
    expect(() => scanSuiteLogs(dir)).not.toThrow();
  });
});
