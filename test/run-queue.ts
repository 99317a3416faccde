import { existsSync, readFileSync } from "node:fs";

/** Read on the event loop's thread, so "thread-self" is that thread. */
const SCHEDSTAT = existsSync("/proc/thread-self/schedstat") ? "/proc/thread-self/schedstat" : undefined;

/**
 * Milliseconds this process's event-loop thread has spent runnable but waiting for a CPU
 * (the second field of Linux's /proc/thread-self/schedstat), or 0 where that is not
 * available. A latency bound on a call whose client and server share this event loop
 * subtracts what the thread waited on the run queue during the call: that is the load of
 * other processes on the machine, not anything the server did (a hash or a stall of the
 * server's own, on this thread, is run time and stays in the measure).
 */
export function runQueueWaitMs(): number {
  if (!SCHEDSTAT) return 0;
  const fields = readFileSync(SCHEDSTAT, "utf8").split(" ");
  return Number(fields[1]) / 1e6;
}

/**
 * Run `fn` and return its result with the milliseconds it took on the wall clock less the
 * time this thread waited on the run queue meanwhile (see {@link runQueueWaitMs}).
 */
export async function timedOnCpu<T>(fn: () => Promise<T>): Promise<{ ms: number; waited: number; value: T }> {
  const waitedBefore = runQueueWaitMs();
  const started = performance.now();
  const value = await fn();
  const wall = performance.now() - started;
  const waited = runQueueWaitMs() - waitedBefore;
  return { ms: wall - waited, waited, value };
}
