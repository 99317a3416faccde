import { writeSync } from "node:fs";
import { workerData } from "node:worker_threads";
import { descendants, describeProcesses, killAll } from "./process-tree.mjs";

// The watchdog's own thread (test/watchdog.ts starts one per test worker). Plain JavaScript:
// a worker thread runs outside Vitest's TypeScript transform.

const { beat, label, stallMs, graceMs } = workerData;

/** Writes to stderr, retrying while the pipe is full (the blocked loop may be its only reader). */
function say(text) {
  for (let i = 0; i < 50; i++) {
    try {
      writeSync(2, text);
      return;
    } catch {
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    }
  }
}

let killedAt = 0;
let seen = -1;
let since = Date.now();
setInterval(
  () => {
    // The beat is a count: this thread's own clock times it (a test may fake or move the worker's Date).
    const count = Atomics.load(beat, 0);
    if (count !== seen) {
      seen = count;
      since = Date.now();
    }
    const stalled = Date.now() - since;
    if (stalled < stallMs) {
      killedAt = 0;
      return;
    }
    const where = new TextDecoder().decode(label.subarray(4, 4 + new Int32Array(label.buffer, 0, 1)[0]));
    if (killedAt === 0) {
      const pids = descendants(process.pid);
      say(
        `\n[test watchdog] the event loop of test worker ${process.pid} has not turned for ${Math.round(stalled / 1000)} s, in or after: ${where}\n` +
          (pids.length ? `killing its child processes:\n${describeProcesses(pids)}\n` : ""),
      );
      killAll(pids);
      killedAt = Date.now();
    } else if (Date.now() - killedAt > graceMs) {
      say(`[test watchdog] test worker ${process.pid} is still blocked: killing it (${where})\n`);
      process.kill(process.pid, "SIGKILL");
    }
  },
  Math.min(5_000, stallMs / 4),
);
