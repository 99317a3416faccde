import { availableParallelism } from "node:os";
import { withinDeadline } from "../deadline.js";
import { TesseraError } from "../errors.js";
import { HashWorkers, type Pbkdf2Job } from "./hash-workers.js";

/** Sizes of the {@link HashPool}. */
export interface HashPoolOptions {
  /** Hashes computed at once. */
  concurrency: number;
  /** Hashes waiting for a slot; past it a new one is refused at once. */
  queue: number;
  /**
   * Nice value of the hashing threads (0–19, Linux; see {@link HashWorkers}). Default
   * {@link DEFAULT_HASH_NICE}: hashing gets the CPU that serving requests leaves idle.
   */
  nice?: number;
  /**
   * Whether the hashing threads also run in Linux's SCHED_IDLE class (see
   * {@link HashWorkers}). Default {@link DEFAULT_HASH_IDLE}.
   */
  idle?: boolean;
  /**
   * Milliseconds a password check may wait for its verdict (queue and hash); past it, it is
   * refused with Unavailable and Retry-After while its hash, if started, finishes unheard.
   * 0: no limit. Default {@link DEFAULT_HASH_DEADLINE_MS}. New secrets are never cut short.
   */
  deadlineMs?: number;
}

/**
 * Default nice value of the hashing threads: the lowest priority, because on contended
 * cores hashing at nice 0 beside a saturated event loop takes a large share of the
 * server's CPU from it (bench/results/2026-12-04-flood.md).
 */
export const DEFAULT_HASH_NICE = 19;

/** Default scheduling class of the hashing threads: SCHED_IDLE (see {@link HashWorkers}). */
export const DEFAULT_HASH_IDLE = true;

/**
 * Default deadline of a password check: an answer (or Unavailable with Retry-After) within
 * a second, as issue 18 requires of a login during a flood. A low-priority hash on a busy
 * machine can take seconds; the queue's length alone no longer bounds the wait.
 */
export const DEFAULT_HASH_DEADLINE_MS = 900;

/** Counters of a {@link HashPool} (tests, metrics). */
export interface HashPoolStats {
  /** Hashes started since the pool was made. */
  started: number;
  /** Hashes running now. */
  running: number;
  /** Hashes waiting now. */
  queued: number;
  /** Hashes refused because the queue was full. */
  refused: number;
  /** Password checks refused because their verdict was not ready by the deadline. */
  expired: number;
  /** Whether the hashing threads run at the lowered priority (null before the first hash). */
  niced: boolean | null;
  /** Whether the hashing threads run in the SCHED_IDLE class (null before the first hash). */
  idle: boolean | null;
}

/** The default concurrency: every core but one, which is left to the event loop (at least 1). */
export function defaultHashConcurrency(): number {
  return Math.max(1, availableParallelism() - 1);
}

/** The default queue: four hashes per slot, so that a queued check waits about a second at 600k iterations. */
export function defaultHashQueue(concurrency: number): number {
  return 4 * concurrency;
}

/**
 * What a password check past the queue is answered with: Unavailable with Retry-After, at
 * once, rather than after seconds in a queue. Made once: it is what a flood gets most.
 */
const BUSY = new TesseraError("UNAVAILABLE", "the server is busy verifying passwords; try again shortly", {
  headers: { "retry-after": "1" },
});

/**
 * What a hash is for: checking a presented secret (passwords at Login, Basic, ChangePassword;
 * a token's first use) or hashing a new secret to store (tokens, API keys, credentials,
 * passwords set). New secrets may hold at most half the pool's slots and queue, and wait
 * behind every check: anyone allowed to create tokens could otherwise fill the pool and
 * starve every login.
 */
export type HashPurpose = "verify" | "create";

/**
 * A bounded pool for PBKDF2 (the only CPU-heavy work Tessera does). Unbounded, a flood of
 * wrong passwords takes every core from everything else (bench/results/2026-12-04-flood.md).
 * This caps the hashes
 * running at once (default: cores − 1) and the ones waiting; past both, a check is refused
 * at once with {@link BUSY}, and a check whose verdict is not ready by the deadline too.
 * The hashes themselves run on {@link HashWorkers}: threads at the lowest scheduling
 * priority, so that where cores are contended hashing yields to serving requests
 * (bench/results/2026-12-04-flood.md).
 *
 * Hand-written: a counting semaphore with a bounded FIFO is a few lines, and none of the
 * libraries installed here refuses past a queue length (p-limit queues without bound).
 */
export class HashPool {
  private running = 0;
  private started = 0;
  private refused = 0;
  private expired = 0;
  /** Hashes of new secrets running or waiting. */
  private creating = 0;
  private readonly waiting: Array<() => void> = [];
  /** Hashes of new secrets waiting: they start only when no check waits. */
  private readonly waitingCreations: Array<() => void> = [];
  /** Threads that compute {@link pbkdf2}, started on first use. */
  private workers: HashWorkers | undefined;
  /** Replaced by another pool: its threads stop once its last hash is done. */
  private retired = false;
  /** Recent time of a hash, start to end (moving average, ms; 0 before the first). */
  private hashMs = 0;
  /** When each running hash started (performance.now()), oldest first. */
  private readonly runningSince: number[] = [];

  constructor(readonly options: HashPoolOptions) {}

  /**
   * PBKDF2-SHA256 of `job` on the pool's low-priority threads, within the pool's bounds
   * (and, for a check, its deadline).
   * @throws TesseraError UNAVAILABLE (with Retry-After) when the queue is full or the deadline passes
   */
  pbkdf2(job: Pbkdf2Job, purpose: HashPurpose = "verify"): Promise<Buffer> {
    return this.run(() => {
      this.workers ??= new HashWorkers({
        threads: this.options.concurrency,
        nice: this.options.nice ?? DEFAULT_HASH_NICE,
        idle: this.options.idle ?? DEFAULT_HASH_IDLE,
      });
      return this.workers.pbkdf2(job);
    }, purpose);
  }

  /** Stop the threads once the hashes running or queued here are done (configureHashPool replaced this pool). */
  retire(): void {
    this.retired = true;
    this.closeIfDrained();
  }

  /** The most hashes of new secrets running or waiting at once: half of slots and queue (at least 1). */
  get creationLimit(): number {
    return Math.max(1, Math.floor((this.options.concurrency + this.options.queue) / 2));
  }

  /** Run `task` when a slot is free; rejects at once with Unavailable when the queue (or the share of `create`) is full. */
  run<T>(task: () => Promise<T>, purpose: HashPurpose = "verify"): Promise<T> {
    if (!this.hasRoom(purpose)) {
      this.refused++;
      return Promise.reject(BUSY);
    }
    const create = purpose === "create";
    if (create) this.creating++;
    const job = create
      ? () =>
          task().finally(() => {
            this.creating--;
          })
      : task;
    const deadlineMs = create ? 0 : (this.options.deadlineMs ?? DEFAULT_HASH_DEADLINE_MS);
    if (this.running < this.options.concurrency) {
      notifyWait(0);
      return this.within(deadlineMs, this.start(job));
    }
    const queue = create ? this.waitingCreations : this.waiting;
    const queuedAt = performance.now();
    let dequeue: (() => void) | undefined;
    const result = new Promise<T>((resolve, reject) => {
      const entry = () => {
        dequeue = undefined;
        notifyWait((performance.now() - queuedAt) / 1000);
        this.start(job).then(resolve, reject);
      };
      queue.push(entry);
      // Past the deadline a check still queued leaves the queue: it costs no hash at all.
      dequeue = () => {
        const at = queue.indexOf(entry);
        if (at >= 0) queue.splice(at, 1);
        this.closeIfDrained();
      };
    });
    return this.within(deadlineMs, result, () => dequeue?.());
  }

  /**
   * `result`, or {@link BUSY} once `deadlineMs` has passed (0: no deadline). A hash already
   * running goes on holding its slot: the pool's bound counts the CPU really in use.
   */
  private within<T>(deadlineMs: number, result: Promise<T>, onExpiry?: () => void): Promise<T> {
    if (deadlineMs <= 0) return result;
    return withinDeadline(result, deadlineMs, () => {
      this.expired++;
      onExpiry?.();
      return BUSY;
    });
  }

  /** Whether a hash for `purpose` asked for now would run or queue rather than be refused. */
  hasRoom(purpose: HashPurpose = "verify"): boolean {
    if (purpose === "create" && this.creating >= this.creationLimit) return false;
    if (this.running < this.options.concurrency) return true;
    if (this.waiting.length + this.waitingCreations.length >= this.options.queue) return false;
    return purpose === "create" || !this.wouldMissDeadline();
  }

  /**
   * Whether a check that must queue would, by the recent hash times, get no verdict before
   * its deadline: then it is refused at once, not after waiting the deadline out. Where hashes
   * run at low priority on a busy machine they slow down (seconds each), and a queue bounded
   * by count alone would hold every check, a legitimate login's included, for the whole
   * deadline. A check that finds a free slot always starts: that is how the pool learns that
   * hashing is fast again.
   */
  private wouldMissDeadline(): boolean {
    const deadline = this.options.deadlineMs ?? DEFAULT_HASH_DEADLINE_MS;
    if (deadline <= 0) return false;
    const oldest = this.runningSince[0];
    // A hash running longer than the deadline: nothing queued now will be answered in time.
    if (oldest !== undefined && performance.now() - oldest > deadline) return true;
    // The checks ahead, `concurrency` at a time, then its own hash.
    const rounds = Math.floor(this.waiting.length / this.options.concurrency) + 2;
    return rounds * this.hashMs > deadline;
  }

  /**
   * Refuse at once when a hash asked for now would be refused: lets a password check
   * answer a flood before its database look-up and limiter round trips.
   * @throws TesseraError UNAVAILABLE with Retry-After
   */
  assertRoom(): void {
    if (this.hasRoom()) return;
    this.refused++;
    throw BUSY;
  }

  stats(): HashPoolStats {
    return {
      started: this.started,
      running: this.running,
      queued: this.waiting.length + this.waitingCreations.length,
      refused: this.refused,
      expired: this.expired,
      niced: this.workers?.niced ?? null,
      idle: this.workers?.idle ?? null,
    };
  }

  private async start<T>(task: () => Promise<T>): Promise<T> {
    this.running++;
    this.started++;
    const since = performance.now();
    this.runningSince.push(since);
    try {
      return await task();
    } finally {
      this.running--;
      this.runningSince.splice(this.runningSince.indexOf(since), 1);
      const took = performance.now() - since;
      this.hashMs = this.hashMs === 0 ? took : 0.7 * this.hashMs + 0.3 * took;
      (this.waiting.shift() ?? this.waitingCreations.shift())?.();
      this.closeIfDrained();
    }
  }

  private closeIfDrained(): void {
    if (!this.retired || this.running > 0 || this.waiting.length + this.waitingCreations.length > 0) return;
    this.workers?.close();
    this.workers = undefined;
  }
}

/** Who is told how long each hash waited for a slot (metrics: a histogram). */
const waitObservers = new Set<(seconds: number) => void>();

/**
 * Be told, for every hash that starts in this process, how many seconds it waited for a
 * slot (0 when one was free). Returns the function that stops it. Process-wide, like the
 * pool: a callback here costs nothing on any request that does not hash.
 */
export function observeHashWaits(observer: (seconds: number) => void): () => void {
  waitObservers.add(observer);
  return () => waitObservers.delete(observer);
}

function notifyWait(seconds: number): void {
  for (const observer of waitObservers) observer(seconds);
}

let pool = new HashPool({
  concurrency: defaultHashConcurrency(),
  queue: defaultHashQueue(defaultHashConcurrency()),
  nice: DEFAULT_HASH_NICE,
  idle: DEFAULT_HASH_IDLE,
  deadlineMs: DEFAULT_HASH_DEADLINE_MS,
});

/**
 * The process's hash pool. One per process, not per app: the cores it shares out are the
 * process's, so two apps in one process (tests) share them too.
 */
export function hashPool(): HashPool {
  return pool;
}

/**
 * Size the process's hash pool (createApp does, from `auth.hashConcurrency`,
 * `auth.hashQueue`, `auth.hashNice` and `auth.hashDeadlineMs`). Hashes already running or
 * queued finish on the previous pool, whose threads then stop.
 */
export function configureHashPool(options: Partial<HashPoolOptions>): HashPool {
  const concurrency = options.concurrency ?? defaultHashConcurrency();
  const wanted: Required<HashPoolOptions> = {
    concurrency,
    queue: options.queue ?? defaultHashQueue(concurrency),
    nice: options.nice ?? DEFAULT_HASH_NICE,
    idle: options.idle ?? DEFAULT_HASH_IDLE,
    deadlineMs: options.deadlineMs ?? DEFAULT_HASH_DEADLINE_MS,
  };
  const current = pool.options;
  const same = (Object.keys(wanted) as Array<keyof HashPoolOptions>).every((k) => current[k] === wanted[k]);
  if (!same) {
    pool.retire();
    pool = new HashPool(wanted);
  }
  return pool;
}
