import { spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { expect, it } from "vitest";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** Processes whose command line is exactly `args` (what a stalled fixture left running). */
function running(args: string): number[] {
  const found: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ").trim() === args)
        found.push(Number(entry));
    } catch {
      // Gone meanwhile.
    }
  }
  return found;
}

/*
 * Files that stall their worker beyond Vitest's own timeouts (test/fixtures/stall), run by a
 * Vitest of their own with the suite's watchdog (test/watchdog.ts) and stall reporter
 * (test/stall-reporter.ts) at limits of seconds. Without them that run never ends.
 */
it("ends test files that block their event loop or stop reporting, names them, and leaves no process of theirs behind", async () => {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    TESSERA_TEST_STALL_SECONDS: "5",
    TESSERA_TEST_FILE_STALL_SECONDS: "15",
    NO_COLOR: "1",
  };
  for (const key of Object.keys(env)) if (key.startsWith("VITEST")) delete env[key];
  const child = spawn(
    process.execPath,
    ["node_modules/vitest/vitest.mjs", "run", "--config", "test/fixtures/stall/vitest.config.ts"],
    { cwd: ROOT, env, detached: true, stdio: ["ignore", "pipe", "pipe"] },
  );
  let output = "";
  child.stdout.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr.on("data", (d: Buffer) => (output += d.toString()));
  let timer: NodeJS.Timeout | undefined;
  const code = await new Promise<number | string | null>((resolve) => {
    child.on("close", (c, signal) => resolve(c ?? signal));
    // Not ended: the whole run is a hang; killed, with what it said so far.
    timer = setTimeout(() => {
      process.kill(-child.pid!, "SIGKILL");
      resolve("hung");
    }, 150_000);
  }).finally(() => clearTimeout(timer));
  const text = output;
  expect(code, text.slice(-3000)).toBe(1);
  // A synchronous wait on a child: the child killed, the test failed as any other, the next one run.
  expect(text).toMatch(
    /\[test watchdog\] the event loop of test worker \d+ has not turned for \d+ s, in or after: \S*blocked\.fixture\.ts > waits synchronously/,
  );
  expect(text).toMatch(/✓ runs once the watchdog has ended the wait/);
  // A loop that never yields: its worker killed, its file failed.
  expect(text).toMatch(
    /\[test watchdog\] test worker \d+ is still blocked: killing it \(\S*spin\.fixture\.ts > spins for ever\)/,
  );
  // A wait that nothing times out: the reporter names the file and ends its worker.
  expect(text).toMatch(
    /\[stall reporter\] \S*silent\.fixture\.ts has reported nothing for \d+ s .*its worker: \d+/,
  );
  // Vitest reports the killed workers' files and ends with its summary.
  expect(text.match(/Worker exited unexpectedly/g)).toHaveLength(2);
  expect(text).toMatch(/Test Files +\d+ failed/);
  expect(running("sleep 6001")).toEqual([]);
  expect(running("sleep 6002")).toEqual([]);
  // A worker whose Date a test moved, waiting past the limit with its event loop turning, is left alone.
  expect(text).toMatch(/✓ test\/fixtures\/stall\/fake-clock\.fixture\.ts/);
  // A child left running by a file that passed goes with its worker.
  expect(text).toMatch(/✓ test\/fixtures\/stall\/leftover\.fixture\.ts/);
  expect(running("sleep 6003")).toEqual([]);
}, 180_000);
