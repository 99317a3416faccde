import { Worker } from "node:worker_threads";

/** Options of {@link HashWorkers}. */
export interface HashWorkersOptions {
  /** Threads (one hash at a time each). */
  threads: number;
  /**
   * Nice value each thread gives itself (0–19; Linux). At 19 the scheduler weighs a hashing
   * thread 15 against 1024 for the event loop: hashing then runs on CPU the event loop leaves
   * idle and takes almost none from it when cores are contended.
   */
  nice: number;
  /**
   * Linux: each thread also moves itself into the SCHED_IDLE scheduling class (through
   * util-linux's `chrt`), so it runs only on CPU that no normal thread wants: a nice-19
   * thread still takes its weighted share (15/1024) and, counted as busy, pushes the event
   * loop and everything else onto the other cores (issue 18's flood; the A/B is in
   * bench/results/2026-12-05-quiet-session3.md). Where it cannot be set the thread keeps
   * its nice value and says so ({@link HashWorkers.idle}).
   */
  idle?: boolean;
  /**
   * Milliseconds a thread may wait for a hash before it stops (the next hash starts it
   * again). Default {@link DEFAULT_HASH_THREAD_IDLE_MS}. Each thread is a V8 isolate of its
   * own: kept for good after one login, it holds its memory for the process's life.
   */
  idleMs?: number;
}

/**
 * Default {@link HashWorkersOptions.idleMs}: long enough that a burst of logins reuses its
 * threads, short enough that a quiet server gives their memory back.
 */
export const DEFAULT_HASH_THREAD_IDLE_MS = 30_000;

/** PBKDF2-SHA256 parameters of one hash. */
export interface Pbkdf2Job {
  secret: string;
  salt: Uint8Array;
  iterations: number;
  keyLength: number;
}

/**
 * The code each thread runs: plain CommonJS given as a string (`eval`), so that the same
 * code runs under tsx, vitest (which transforms the main thread only, never a worker's
 * file) and the compiled build, with no worker file to ship beside the build.
 *
 * A thread renices itself: on Linux the nice value belongs to a thread, and
 * setpriority(PRIO_PROCESS, tid) (what os.setPriority calls) on the thread's own id —
 * read from /proc/thread-self — changes that thread alone, needing no privilege to lower
 * it. Elsewhere (no /proc/thread-self) the thread keeps its priority and says so.
 *
 * The hash is pbkdf2Sync on the thread itself: the async crypto.pbkdf2 would hand it to
 * libuv's pool, whose threads are not reniced (and are shared with file and DNS work).
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const { pbkdf2Sync } = require("node:crypto");
let niced = false;
let idle = false;
if (workerData.nice > 0 || workerData.idle) {
  try {
    const fs = require("node:fs");
    const tid = Number(fs.readlinkSync("/proc/thread-self").split("/").pop());
    if (workerData.nice > 0) {
      require("node:os").setPriority(tid, workerData.nice);
      niced = require("node:os").getPriority(tid) === workerData.nice;
    }
    if (workerData.idle) {
      // sched_setscheduler has no Node binding; chrt (util-linux) makes the call for this thread id.
      require("node:child_process").execFileSync("chrt", ["--idle", "-p", "0", String(tid)], { stdio: "ignore", timeout: 5000 });
      const stat = fs.readFileSync("/proc/thread-self/stat", "utf8");
      // Field 41 (policy) of proc(5)'s stat; 5 is SCHED_IDLE.
      idle = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[38] === "5";
    }
  } catch {}
}
parentPort.postMessage({ ready: true, niced, idle });
parentPort.on("message", (job) => {
  try {
    const hash = pbkdf2Sync(job.secret, job.salt, job.iterations, job.keyLength, "sha256");
    parentPort.postMessage({ hash }, [hash.buffer]);
  } catch (err) {
    parentPort.postMessage({ error: String(err && err.message) });
  }
});
`;

interface Slot {
  worker: Worker;
  /** The job running on it, if any. */
  current: { resolve(hash: Buffer): void; reject(err: Error): void } | null;
  /** Stops the thread once it has waited {@link HashWorkersOptions.idleMs} for a hash. */
  reaper: NodeJS.Timeout | undefined;
}

/**
 * A fixed set of worker threads that compute PBKDF2-SHA256 at a lowered scheduling
 * priority, so that a flood of password checks takes CPU from nothing that serves requests
 * (issue 18). It runs at most `threads` hashes at once and queues the rest; the bounds that
 * matter (queue length, refusals, new secrets' share) are {@link HashPool}'s, in front of it.
 *
 * Hand-written rather than piscina: piscina loads its task from a file (a `.ts` source
 * under tsx and vitest, a `.js` build when deployed) and renices through an optional
 * native addon, where `os.setPriority` on the thread's own id does it with none; the
 * queueing piscina would add is already HashPool's.
 */
export class HashWorkers {
  private readonly slots: Array<Slot | null>;
  private readonly waiting: Array<{ job: Pbkdf2Job; resolve(hash: Buffer): void; reject(err: Error): void }> =
    [];
  private closed = false;
  /** Whether the threads lowered their priority (null until one has started). */
  private reniced: boolean | null = null;
  /** Whether the threads run in the SCHED_IDLE class (null until one has started). */
  private idled: boolean | null = null;

  constructor(readonly options: HashWorkersOptions) {
    this.slots = Array.from({ length: Math.max(1, options.threads) }, () => null);
  }

  /** Whether the threads run at the lowered priority: null before the first hash, false where the platform refuses. */
  get niced(): boolean | null {
    return this.options.nice > 0 ? this.reniced : false;
  }

  /** Whether the threads run in the SCHED_IDLE class: null before the first hash, false where not asked or not possible. */
  get idle(): boolean | null {
    return this.options.idle ? this.idled : false;
  }

  /** Threads started and not yet stopped (tests). */
  get threadsRunning(): number {
    return this.slots.filter((s) => s !== null).length;
  }

  /** Compute PBKDF2-SHA256 on a thread; resolves with the derived key. */
  pbkdf2(job: Pbkdf2Job): Promise<Buffer> {
    if (this.closed) return Promise.reject(new Error("the hash workers are closed"));
    return new Promise<Buffer>((resolve, reject) => {
      this.waiting.push({ job, resolve, reject });
      this.dispatch();
    });
  }

  /** Stop every thread once its running hash (if any) is done; later calls are refused. */
  close(): void {
    this.closed = true;
    for (const w of this.waiting.splice(0)) w.reject(new Error("the hash workers are closed"));
    for (const [i, slot] of this.slots.entries()) {
      if (slot && slot.current === null) {
        clearTimeout(slot.reaper);
        void slot.worker.terminate();
        this.slots[i] = null;
      }
    }
  }

  private dispatch(): void {
    while (this.waiting.length > 0) {
      const index = this.slots.findIndex((s) => s === null || s.current === null);
      if (index < 0) return;
      const slot = this.slots[index] ?? this.spawn(index);
      const next = this.waiting.shift()!;
      clearTimeout(slot.reaper);
      slot.reaper = undefined;
      slot.current = { resolve: next.resolve, reject: next.reject };
      // A thread with a hash to compute keeps the process alive (a CLI awaiting it would
      // otherwise exit mid-hash); an idle one does not (see spawn).
      slot.worker.ref();
      slot.worker.postMessage(next.job);
    }
  }

  private spawn(index: number): Slot {
    const worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { nice: this.options.nice, idle: this.options.idle === true },
      // A hash needs little memory: keep each thread's heap small.
      resourceLimits: { maxOldGenerationSizeMb: 32, maxYoungGenerationSizeMb: 4 },
    });
    const slot: Slot = { worker, current: null, reaper: undefined };
    this.slots[index] = slot;
    worker.on(
      "message",
      (message: { ready?: true; niced?: boolean; idle?: boolean; hash?: Uint8Array; error?: string }) => {
        if (message.ready) {
          this.reniced = message.niced ?? false;
          this.idled = message.idle ?? false;
          return;
        }
        const current = slot.current;
        slot.current = null;
        worker.unref();
        if (this.closed) {
          void worker.terminate();
          this.slots[index] = null;
        }
        if (current) {
          if (message.hash)
            current.resolve(Buffer.from(message.hash.buffer, message.hash.byteOffset, message.hash.length));
          else current.reject(new Error(message.error ?? "PBKDF2 failed"));
        }
        this.dispatch();
        if (slot.current === null && this.slots[index] === slot) this.reapLater(index, slot);
      },
    );
    const fail = (err: Error) => {
      // A thread that died is replaced on the next hash; its job fails (the caller answers Internal).
      if (this.slots[index] === slot) this.slots[index] = null;
      const current = slot.current;
      slot.current = null;
      current?.reject(err);
      if (!this.closed) this.dispatch();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(new Error(`a hash worker exited (${code})`)));
    // Idle threads do not keep the process alive. After the listeners: adding a "message"
    // listener refs the worker's port again (measured: `tessera init` never exited).
    worker.unref();
    return slot;
  }

  /** Stop `slot`'s thread if it is still idle after {@link HashWorkersOptions.idleMs}. */
  private reapLater(index: number, slot: Slot): void {
    clearTimeout(slot.reaper);
    slot.reaper = setTimeout(() => {
      if (slot.current !== null || this.slots[index] !== slot) return;
      this.slots[index] = null;
      void slot.worker.terminate();
    }, this.options.idleMs ?? DEFAULT_HASH_THREAD_IDLE_MS);
    slot.reaper.unref();
  }
}
