import { availableParallelism } from "node:os";
import { TesseraError } from "../errors.js";
import { ScopedAsyncLocalStorage } from "../storage/orm-async-context.js";

/** Sizes of the {@link HashPool}. */
export interface HashPoolOptions {
  /** Hashes computed at once. */
  concurrency: number;
  /** Hashes waiting for a slot; past it a new one is refused at once. */
  queue: number;
}

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
 * Set while a credential from an IP that has spent its failure budget is verified: any hash
 * asked for within is refused with the store (RATE_LIMITED). Scoped, so that promise hooks
 * are on only while such a verification runs (see orm-async-context.ts).
 */
const noHashing = new ScopedAsyncLocalStorage<TesseraError>();

/**
 * Run `verify` with every hash in it refused with `refusal`: what needs no PBKDF2 (a
 * token verified before, found in the verified-secret cache) still goes through.
 */
export function withoutHashing<T>(refusal: TesseraError, verify: () => Promise<T>): Promise<T> {
  return noHashing.run(refusal, verify);
}

/** The refusal a hash asked for now would get from {@link withoutHashing}, if any. */
export function hashingForbidden(): TesseraError | undefined {
  return noHashing.getStore();
}

/**
 * What a hash is for: checking a presented secret (passwords at Login, Basic, ChangePassword;
 * a token's first use) or hashing a new secret to store (tokens, API keys, credentials,
 * passwords set). New secrets may hold at most half the pool's slots and queue, and wait
 * behind every check: anyone allowed to create tokens could otherwise fill the pool and
 * starve every login.
 */
export type HashPurpose = "verify" | "create";

/**
 * A bounded pool for PBKDF2 (the only CPU-heavy work Tessera does). PBKDF2 runs on the
 * libuv thread pool, which has four threads whatever the core count: unbounded, a flood of
 * wrong passwords takes every core and every thread from everything else (measured: 16
 * concurrent wrong-password logins cut authenticated throughput to a quarter). This caps
 * the hashes running at once (default: cores − 1) and the ones waiting; past both, a check
 * is refused at once with {@link BUSY}.
 *
 * Hand-written: a counting semaphore with a bounded FIFO is a few lines, and none of the
 * libraries installed here refuses past a queue length (p-limit queues without bound;
 * a worker-thread pool would add a thread per hash on top of libuv's).
 */
export class HashPool {
  private running = 0;
  private started = 0;
  private refused = 0;
  /** Hashes of new secrets running or waiting. */
  private creating = 0;
  private readonly waiting: Array<() => void> = [];
  /** Hashes of new secrets waiting: they start only when no check waits. */
  private readonly waitingCreations: Array<() => void> = [];

  constructor(readonly options: HashPoolOptions) {}

  /** The most hashes of new secrets running or waiting at once: half of slots and queue (at least 1). */
  get creationLimit(): number {
    return Math.max(1, Math.floor((this.options.concurrency + this.options.queue) / 2));
  }

  /** Run `task` when a slot is free; rejects at once with Unavailable when the queue (or the share of `create`) is full. */
  run<T>(task: () => Promise<T>, purpose: HashPurpose = "verify"): Promise<T> {
    const forbidden = noHashing.getStore();
    if (forbidden !== undefined) return Promise.reject(forbidden);
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
    if (this.running < this.options.concurrency) {
      notifyWait(0);
      return this.start(job);
    }
    const queuedAt = performance.now();
    return new Promise<T>((resolve, reject) => {
      (create ? this.waitingCreations : this.waiting).push(() => {
        notifyWait((performance.now() - queuedAt) / 1000);
        this.start(job).then(resolve, reject);
      });
    });
  }

  /** Whether a hash for `purpose` asked for now would run or queue rather than be refused. */
  hasRoom(purpose: HashPurpose = "verify"): boolean {
    if (purpose === "create" && this.creating >= this.creationLimit) return false;
    return (
      this.running < this.options.concurrency ||
      this.waiting.length + this.waitingCreations.length < this.options.queue
    );
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
    };
  }

  private async start<T>(task: () => Promise<T>): Promise<T> {
    this.running++;
    this.started++;
    try {
      return await task();
    } finally {
      this.running--;
      (this.waiting.shift() ?? this.waitingCreations.shift())?.();
    }
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
});

/**
 * The process's hash pool. One per process, not per app: the cores it shares out are the
 * process's, so two apps in one process (tests) share them too.
 */
export function hashPool(): HashPool {
  return pool;
}

/**
 * Size the process's hash pool (createApp does, from `auth.hashConcurrency` and
 * `auth.hashQueue`). Hashes already running or queued finish on the previous pool.
 */
export function configureHashPool(options: Partial<HashPoolOptions>): HashPool {
  const concurrency = options.concurrency ?? defaultHashConcurrency();
  const queue = options.queue ?? defaultHashQueue(concurrency);
  const current = pool.options;
  if (current.concurrency !== concurrency || current.queue !== queue)
    pool = new HashPool({ concurrency, queue });
  return pool;
}
