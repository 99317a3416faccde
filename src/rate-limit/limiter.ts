// One fixed-window limiter over rate-limiter-flexible (memory, or Redis shared between
// instances): consume, refund and block, with the outcome the edge turns into headers.
import { type RateLimiterAbstract, RateLimiterMemory, RateLimiterRes } from "rate-limiter-flexible";
import type { LocalCount } from "./local-count.js";

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
  /** Counted in this instance's memory because the shared store (Redis) did not answer. */
  local?: boolean;
}

/** Most keys {@link Limiter.spentNow} remembers: an address flood must not grow it without bound. */
const MAX_SPENT_KEYS = 10_000;

/** A fixed-window limiter over rate-limiter-flexible (memory, or Redis to share between instances). */
export class Limiter {
  /** Requests this limiter refused since start (metrics read it when scraped). */
  refused = 0;
  /** Requests counted in memory because the shared store (Redis) did not answer (metrics read it). */
  countedLocally = 0;
  /**
   * Keys whose window this instance saw spent (a refusal, or the count reaching the limit),
   * with when that ends (ms since the epoch): what {@link spentNow} reads. Only spent keys
   * are entered, so a call that finds its budget left pays one comparison.
   */
  private readonly spent = new Map<string, number>();

  /** The memory store's counter when `impl` is rate-limiter-flexible's memory limiter alone ({@link consumeNow}). */
  private readonly memory: MemoryStorage | undefined;
  /** The last key {@link consumeNow} counted, and the store's key for it (`impl.getKey`). */
  private lastKey: string | undefined;
  private lastStoreKey = "";

  constructor(
    private readonly impl: RateLimiterAbstract,
    readonly limit: number,
    /** What it limits, as the `limiter` label of `tessera_rate_limit_refusals_total` names it. */
    readonly name = "unnamed",
    /** With a shared store: where this instance counts while the store does not answer. */
    private readonly local?: LocalCount,
  ) {
    this.memory = memoryStorageOf(impl);
  }

  /** Count one request for `key`. */
  async consume(key: string): Promise<LimitResult> {
    const now = this.consumeNow(key);
    if (now !== undefined) return now;
    const local = this.local;
    if (local !== undefined) return this.consumeShared(key, local);
    try {
      const res = await this.impl.consume(key);
      return this.allow(key, res.remainingPoints, res.msBeforeNext, res.consumedPoints);
    } catch (res) {
      if (res instanceof RateLimiterRes) return this.refuse(key, res.msBeforeNext);
      throw res;
    }
  }

  /**
   * Count one request for `key` in the shared store, with the points this instance counted
   * for it while the store did not answer (so they are not granted again); or, the store not
   * answering, in this instance's memory, from the store's last count of the key.
   */
  private async consumeShared(key: string, local: LocalCount): Promise<LimitResult> {
    const blockedMs = local.blockedMs(key);
    if (blockedMs > 0) {
      // A block Redis could not take when it was made: handed to Redis as soon as it answers,
      // so that every instance refuses the key for the rest of it.
      this.countedLocally++;
      await this.impl.block(key, Math.ceil(blockedMs / 1000)).then(
        () => local.forget(key),
        () => undefined,
      );
      return this.refuse(key, blockedMs);
    }
    const owed = local.owed(key);
    let res: RateLimiterRes;
    let allowed = true;
    try {
      res = await this.impl.consume(key, 1 + owed);
    } catch (err) {
      if (err instanceof RateLimiterRes) {
        res = err;
        allowed = false;
      } else {
        this.countedLocally++;
        const mine = local.consume(key);
        const result = mine.allowed
          ? this.allow(key, Math.max(this.limit - mine.consumed, 0), mine.resetMs, mine.consumed)
          : this.refuse(key, mine.resetMs);
        result.local = true;
        return result;
      }
    }
    local.counted(key, owed, res.consumedPoints, Date.now() + res.msBeforeNext);
    if (!allowed) return this.refuse(key, res.msBeforeNext);
    return this.allow(key, res.remainingPoints, res.msBeforeNext, res.consumedPoints);
  }

  /** An admission of `key`, its window remembered as spent when nothing remains. */
  private allow(key: string, remaining: number, resetMs: number, consumed: number): LimitResult {
    if (remaining <= 0) this.remember(key, resetMs);
    return {
      allowed: true,
      limit: this.limit,
      remaining,
      resetMs,
      consumed,
      windowEnd: Date.now() + resetMs,
    };
  }

  /** A refusal of `key` for `resetMs`, counted and remembered. */
  private refuse(key: string, resetMs: number): LimitResult {
    this.refused++;
    this.remember(key, resetMs);
    return { allowed: false, limit: this.limit, remaining: 0, resetMs };
  }

  /**
   * Count one request for `key` without a promise, when the store is memory alone (no
   * Redis): what rate-limiter-flexible's `RateLimiterMemory.consume` does (the same count in
   * the same store, the same window and refusal), minus the promise it wraps that in. An
   * admitted call counts two limits (per IP, per principal); with a promise each it could
   * not be decided synchronously. Undefined when the store needs I/O (Redis): `consume`.
   */
  consumeNow(key: string): LimitResult | undefined {
    const memory = this.memory;
    if (memory === undefined) return undefined;
    const impl = this.impl;
    // The store's key of the last key counted, kept: the same caller's next call makes no
    // new string to look up (nor hashes one).
    if (key !== this.lastKey) {
      this.lastKey = key;
      this.lastStoreKey = impl.getKey(key);
    }
    const res = memory.incrby(this.lastStoreKey, 1, impl.duration);
    const remaining = Math.max(impl.points - res.consumedPoints, 0);
    if (res.consumedPoints > impl.points) return this.refuse(key, res.msBeforeNext);
    return this.allow(key, remaining, res.msBeforeNext, res.consumedPoints);
  }

  /**
   * Give back one point counted for `key` (a reservation that was not spent) by `taken`, the
   * result that counted it: only while its window lasts. A point given back after the
   * window rolled over would be credit in the next one (a budget of 20 becoming 40 for
   * whoever makes its checks finish just past the window's end).
   */
  async refund(key: string, taken: LimitResult): Promise<void> {
    if (taken.windowEnd !== undefined && Date.now() >= taken.windowEnd) return;
    this.spent.delete(key);
    const local = this.local;
    if (local !== undefined && taken.local) return local.refund(key);
    // The store not answering, the point is given back here (never below zero: a negative
    // count would be budget the store never granted).
    await this.orLocally(this.impl.reward(key, 1), () => local?.refund(key));
  }

  /** Forget `key`'s count (and any block on it). */
  async reset(key: string): Promise<void> {
    this.spent.delete(key);
    this.local?.forget(key);
    await this.orLocally(this.impl.delete(key), () => undefined);
  }

  /** Refuse `key` for `seconds`, whatever its count. */
  async block(key: string, seconds: number): Promise<void> {
    await this.orLocally(this.impl.block(key, seconds), () => this.local?.block(key, seconds * 1000));
    this.remember(key, seconds * 1000);
  }

  /** Await `call` to the store; with a shared store that does not answer, do `instead` here. */
  private async orLocally(call: Promise<unknown>, instead: () => void): Promise<void> {
    if (this.local === undefined) {
      await call;
      return;
    }
    try {
      await call;
    } catch {
      this.countedLocally++;
      instead();
    }
  }

  /**
   * Whether `key`'s window is spent, as far as this instance has seen (synchronous, no I/O):
   * the refusal its next request would get, or undefined when this instance has not seen it
   * spent (with Redis, other instances may have spent it: the next `consume` will tell).
   * For answers that must not wait for the store, e.g. calls shed while the hash pool is
   * full (admission/shedding.ts), which then get the 429 they would get anyway.
   */
  spentNow(key: string): LimitResult | undefined {
    if (!this.anySpent) return undefined;
    const until = this.spent.get(key);
    if (until === undefined) return undefined;
    const resetMs = until - Date.now();
    if (resetMs <= 0) {
      this.spent.delete(key);
      return undefined;
    }
    return { allowed: false, limit: this.limit, remaining: 0, resetMs };
  }

  /** Whether {@link spentNow} may find any key spent (a check before making the key). */
  get anySpent(): boolean {
    return this.spent.size > 0;
  }

  /** Remember `key` as spent for `ms` more (see {@link spentNow}), within {@link MAX_SPENT_KEYS}. */
  private remember(key: string, ms: number): void {
    // Re-entered, so that the map's order stays (about) the order in which windows end.
    this.spent.delete(key);
    // Full: the oldest entry goes (usually a window that has ended; at worst a spent key is
    // forgotten here and its next call asks the store, as it would without this map).
    if (this.spent.size >= MAX_SPENT_KEYS) this.spent.delete(this.spent.keys().next().value!);
    this.spent.set(key, Date.now() + ms);
  }

  /** Whether `key` has used up its window, without counting a request. */
  async exhausted(key: string): Promise<LimitResult | null> {
    const res = await this.impl.get(key);
    if (res && res.consumedPoints >= this.limit)
      return { allowed: false, limit: this.limit, remaining: 0, resetMs: res.msBeforeNext };
    return null;
  }
}

/**
 * rate-limiter-flexible's memory store (`RateLimiterMemory._memoryStorage`, stable across v5–v11): a
 * private field, so package.json pins the library's exact version and test/rate-limit-now.test.ts
 * compares this path with the library's own `consume` on every upgrade.
 */
interface MemoryStorage {
  incrby(key: string, value: number, durationSec: number): RateLimiterRes;
}

/**
 * The store of a memory limiter that `consumeNow` can count in as its `consume` would: no
 * block on refusal and no even spreading (which delay answers: Tessera sets neither), and
 * the store where this version keeps it. Anything else (Redis, a library whose internals
 * moved) is counted by `consume`, as before.
 */
function memoryStorageOf(impl: RateLimiterAbstract): MemoryStorage | undefined {
  if (!(impl instanceof RateLimiterMemory) || impl.blockDuration > 0 || impl.execEvenly) return undefined;
  const storage = (impl as unknown as { _memoryStorage?: Partial<MemoryStorage> })._memoryStorage;
  return typeof storage?.incrby === "function" ? (storage as MemoryStorage) : undefined;
}
