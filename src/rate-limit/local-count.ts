// What one instance counts of a shared (Redis) limit while Redis is away or late: carried on
// from the last count Redis gave, and handed back to Redis once it answers, so that an outage
// grants no budget twice (once in Redis, once in memory).

/** Most keys remembered (last shared counts, and counts kept here): a flood must not grow them without bound. */
const MAX_KEYS = 10_000;

/** One key's count in this instance's memory, for a window that ends at `end` (ms since the epoch). */
interface Entry {
  count: number;
  end: number;
  /** Points counted here and not yet in Redis. */
  owed: number;
  /** Refused until then (a block made while Redis was away), ms since the epoch. */
  blockedUntil: number;
}

/** Outcome of a count made here: the points in the window and when it ends. */
export interface LocalResult {
  allowed: boolean;
  consumed: number;
  resetMs: number;
}

/**
 * The per-instance fall-back of one shared limit. While Redis answers it only remembers each
 * key's last count there; when a call cannot reach Redis it counts from that count (in the
 * same window) instead of from zero, and the points it counted are owed to Redis, added to
 * the key's next count there, so a fleet refuses them too once Redis is back.
 */
export class LocalCount {
  private readonly last = new Map<string, { consumed: number; end: number }>();
  private readonly entries = new Map<string, Entry>();

  constructor(
    readonly points: number,
    private readonly durationMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Points counted here for `key` that Redis has not seen (0 for almost every key). */
  owed(key: string): number {
    if (this.entries.size === 0) return 0;
    const e = this.live(key);
    return e ? e.owed : 0;
  }

  /** Whether `key` is blocked here (a block Redis could not take), and for how long. */
  blockedMs(key: string): number {
    const e = this.entries.size === 0 ? undefined : this.live(key);
    return e ? Math.max(0, e.blockedUntil - this.now()) : 0;
  }

  /** Redis counted `key` (`pushed` of the owed points with it): its count is `consumed` until `end`. */
  counted(key: string, pushed: number, consumed: number, end: number): void {
    if (this.last.size >= MAX_KEYS && !this.last.has(key)) this.last.delete(this.last.keys().next().value!);
    this.last.set(key, { consumed, end });
    if (this.entries.size === 0) return;
    const e = this.entries.get(key);
    if (e === undefined) return;
    e.owed -= pushed;
    if (e.owed <= 0 && e.blockedUntil <= this.now()) this.entries.delete(key);
  }

  /** Count one point for `key` here (Redis did not answer). */
  consume(key: string): LocalResult {
    const e = this.entry(key);
    e.count++;
    e.owed++;
    const now = this.now();
    if (e.blockedUntil > now) return { allowed: false, consumed: e.count, resetMs: e.blockedUntil - now };
    return { allowed: e.count <= this.points, consumed: e.count, resetMs: e.end - now };
  }

  /** Give back one point counted for `key` (here, or in Redis when Redis cannot take it back). */
  refund(key: string): void {
    const e = this.live(key);
    if (!e) return;
    e.count = Math.max(0, e.count - 1);
    e.owed = Math.max(0, e.owed - 1);
  }

  /**
   * Refuse `key` here for `ms` (Redis could not take the block). As a block in Redis does, it
   * replaces the key's count and window: when it ends, the key starts afresh.
   */
  block(key: string, ms: number): void {
    const e = this.entry(key);
    e.blockedUntil = e.end = this.now() + ms;
    e.owed = 0;
  }

  /** Forget `key` (its count was reset). */
  forget(key: string): void {
    this.entries.delete(key);
    this.last.delete(key);
  }

  /** `key`'s entry if its window still runs. */
  private live(key: string): Entry | undefined {
    const e = this.entries.get(key);
    if (e === undefined) return undefined;
    if (e.end > this.now()) return e;
    this.entries.delete(key);
    return undefined;
  }

  /** `key`'s entry, made from its last count in Redis (when that window still runs) or empty. */
  private entry(key: string): Entry {
    const found = this.live(key);
    if (found) return found;
    const now = this.now();
    const last = this.last.get(key);
    const e: Entry =
      last && last.end > now
        ? { count: last.consumed, end: last.end, owed: 0, blockedUntil: 0 }
        : { count: 0, end: now + this.durationMs, owed: 0, blockedUntil: 0 };
    if (this.entries.size >= MAX_KEYS) this.entries.delete(this.entries.keys().next().value!);
    this.entries.set(key, e);
    return e;
  }
}
