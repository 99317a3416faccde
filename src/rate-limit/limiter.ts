// One fixed-window limiter over rate-limiter-flexible (memory, or Redis shared between
// instances): consume, refund and block, with the outcome the edge turns into headers.
import { type RateLimiterAbstract, RateLimiterRes } from "rate-limiter-flexible";

/** Outcome of one counted request. */
export interface LimitResult {
  allowed: boolean;
  limit: number;
  remaining: number;
  /** Milliseconds until the window resets. */
  resetMs: number;
  /** Points counted in the window, this request's included. */
  consumed?: number;
  /** When the window this request was counted in ends (ms since the epoch). */
  windowEnd?: number;
}

/** A fixed-window limiter over rate-limiter-flexible (memory, or Redis to share between instances). */
export class Limiter {
  /** Requests this limiter refused since start (metrics read it when scraped). */
  refused = 0;

  constructor(
    private readonly impl: RateLimiterAbstract,
    readonly limit: number,
    /** What it limits, as the `limiter` label of `tessera_rate_limit_refusals_total` names it. */
    readonly name = "unnamed",
  ) {}

  /** Count one request for `key`. */
  async consume(key: string): Promise<LimitResult> {
    try {
      const res = await this.impl.consume(key);
      return {
        allowed: true,
        limit: this.limit,
        remaining: res.remainingPoints,
        resetMs: res.msBeforeNext,
        consumed: res.consumedPoints,
        windowEnd: Date.now() + res.msBeforeNext,
      };
    } catch (res) {
      if (res instanceof RateLimiterRes) {
        this.refused++;
        return { allowed: false, limit: this.limit, remaining: 0, resetMs: res.msBeforeNext };
      }
      throw res;
    }
  }

  /**
   * Give back one point counted for `key` (a reservation that was not spent) by `taken`, the
   * result that counted it: only while its window lasts. A point given back after the
   * window rolled over would be credit in the next one (a budget of 20 becoming 40 for
   * whoever makes its checks finish just past the window's end).
   */
  async refund(key: string, taken: LimitResult): Promise<void> {
    if (taken.windowEnd !== undefined && Date.now() >= taken.windowEnd) return;
    await this.impl.reward(key, 1);
  }

  /** Forget `key`'s count (and any block on it). */
  async reset(key: string): Promise<void> {
    await this.impl.delete(key);
  }

  /** Refuse `key` for `seconds`, whatever its count. */
  async block(key: string, seconds: number): Promise<void> {
    await this.impl.block(key, seconds);
  }

  /** Whether `key` has used up its window, without counting a request. */
  async exhausted(key: string): Promise<LimitResult | null> {
    const res = await this.impl.get(key);
    if (res && res.consumedPoints >= this.limit)
      return { allowed: false, limit: this.limit, remaining: 0, resetMs: res.msBeforeNext };
    return null;
  }
}
