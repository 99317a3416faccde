import { withinDeadline } from "../deadline.js";

// Whether Redis answers, as the limiters find it: while it is away they count per instance
// at once instead of each waiting for its own deadline.

/** Where the limiters report Redis going away and coming back. */
export interface RedisStateLog {
  warn(msg: string): void;
  info(msg: string): void;
}

/**
 * Whether Redis answers, as the limiters' calls find it: the first failure (an error, or
 * no answer within the deadline) logs "Redis unavailable, limiting per instance" once,
 * and for the next second every call goes straight to the in-process limiter instead of
 * waiting for its own deadline; then one call at a time tries Redis again, and the first
 * that succeeds logs "Redis back" once.
 */
export class RedisState {
  private down = false;
  private retryAt = 0;
  private probing = false;

  /**
   * @param deadlineMs how long a call may wait for Redis's answer (0: as long as the call
   *   itself lets it). Not ioredis's `commandTimeout`: a plain timer, that one takes a busy
   *   event loop for a Redis that does not answer (see {@link withinDeadline}).
   */
  constructor(
    private readonly log: RedisStateLog,
    private readonly retryMs = 1000,
    private readonly now: () => number = Date.now,
    private readonly deadlineMs = 0,
  ) {}

  /** Whether Redis is considered available now. */
  get available(): boolean {
    return !this.down;
  }

  /**
   * Take Redis for away as a failed call would (logged once; calls go to the in-process
   * limiter until the retry time): the start's first connection failed.
   */
  unavailable(): void {
    this.retryAt = this.now() + this.retryMs;
    if (!this.down) {
      this.down = true;
      this.log.warn("Redis unavailable, limiting per instance");
    }
  }

  /** Run one Redis call, or refuse it at once while Redis is known to be away. */
  async run<T>(call: () => Promise<T>): Promise<T> {
    let probe = false;
    if (this.down) {
      if (this.probing || this.now() < this.retryAt) throw new Error("Redis unavailable");
      this.probing = probe = true;
    }
    try {
      const ms = this.deadlineMs;
      const result = await (ms > 0
        ? withinDeadline(call(), ms, () => new Error(`Redis did not answer within ${ms} ms`))
        : call());
      if (this.down) {
        this.down = false;
        this.log.info("Redis back");
      }
      return result;
    } catch (err) {
      this.unavailable();
      throw err;
    } finally {
      if (probe) this.probing = false;
    }
  }
}
