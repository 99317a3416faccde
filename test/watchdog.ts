import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import { beforeEach, expect } from "vitest";
import { descendants, killAll } from "./process-tree.mjs";

/**
 * A watchdog thread in every test worker (a setup file: test/vitest.config.ts).
 *
 * Vitest's testTimeout and hookTimeout are timers on the worker's event loop: a test that
 * blocks the loop (execFileSync or spawnSync on a child that never ends, Atomics.wait on a
 * pipe nobody reads, a busy or microtask loop) is never timed out, its file never finishes,
 * and the whole run waits until CI kills it, without saying where. The loop stamps a
 * heartbeat every second; a thread of its own, which runs while the loop is blocked, sees
 * the stamp grow old past TESSERA_TEST_STALL_SECONDS (default 300, far above any test's
 * timeout). It then names the test, kills the worker's child processes (which ends a
 * synchronous wait on one: the test then fails as any other), and if the loop still does
 * not turn, kills the worker itself: Vitest reports its file failed and the run goes on.
 */

const STALL_MS = Number(process.env.TESSERA_TEST_STALL_SECONDS || 300) * 1000;
/** After the children were killed, how long the loop has to turn again. */
const GRACE_MS = Math.min(15_000, STALL_MS);

declare global {
  var __tesseraWatchdog: { label: Uint8Array } | undefined;
}

if (!globalThis.__tesseraWatchdog && STALL_MS > 0) {
  const beat = new Int32Array(new SharedArrayBuffer(4));
  const label = new Uint8Array(new SharedArrayBuffer(4 + 1024));
  const timer = setInterval(() => Atomics.add(beat, 0, 1), 1000);
  timer.unref();
  const thread = new Worker(new URL("./watchdog-thread.mjs", import.meta.url), {
    workerData: { beat, label, stallMs: STALL_MS, graceMs: GRACE_MS },
  });
  thread.unref();
  globalThis.__tesseraWatchdog = { label };
}

// Vitest stops a worker with SIGTERM once its file is done (or failed): a server, CLI or load
// generator a test started and did not stop (a test that timed out skips its own clean-up)
// would outlive it, and work on for the rest of the run. They go with the worker.
process.once("SIGTERM", () => {
  killAll(descendants(process.pid));
  process.exit(143);
});

/** What the worker runs now, for the watchdog's report. */
function mark(text: string): void {
  const label = globalThis.__tesseraWatchdog?.label;
  if (!label) return;
  const bytes = new TextEncoder().encode(text).subarray(0, label.length - 4);
  label.set(bytes, 4);
  new Int32Array(label.buffer, 0, 1)[0] = bytes.length;
}

// The stall reporter (test/stall-reporter.ts) finds the worker of a file that stopped reporting.
const file = expect.getState().testPath ?? "";
mark(file);
if (process.env.TESSERA_TEST_WORKERS_DIR && file)
  try {
    writeFileSync(join(process.env.TESSERA_TEST_WORKERS_DIR, String(process.pid)), file);
  } catch {
    // The reporter's folder is gone (a run ending): nothing to find this worker by.
  }

beforeEach(() => {
  const { testPath, currentTestName } = expect.getState();
  mark(`${testPath ?? ""} > ${currentTestName ?? ""}`);
});
