import { errors, TesseraError } from "../errors.js";
import type { RevocationEventRepository } from "../storage/repositories/revocation-events.js";
import type { SqlRunner } from "../storage/sql.js";
import { type FeedAnchor, markOf } from "./revocation-cursor.js";
import type { RevocationFeed } from "./revocation-feed.js";

/**
 * How long a verification waits for its instance to catch up with the feed before Unavailable,
 * at most: below the SDK's default `verifyTimeoutMs` (2 s), so that the caller hears the
 * answer rather than leaving first (a call with a deadline waits {@link DEADLINE_MARGIN_MS} less than it).
 */
export const CATCH_UP_MS = 1_500;

/** What a call with a deadline keeps of it for the verification and the answer's way back. */
export const DEADLINE_MARGIN_MS = 250;

/** Cursors opened and kept (a caller sends one until its next event): past it the map starts over. */
const KEPT_CURSORS = 1_024;

/**
 * Events read by the feed (and marks caught up with) that are kept: a cursor naming an older
 * one costs a read and an emptied state cache. A cursor names one of the last few, as a rule;
 * kept deep so that a caller cycling through old cursors needs that many events to pass and
 * that many streams opened first (a few MB at most: an event's fields, or an 8-byte mark).
 */
export const KEPT_EVENTS = 16_384;

/** A caller's cursor, opened: its position and mark, and the epoch in which it was found caught up with. */
export interface CaughtUpCursor {
  readonly position: number;
  /** None: an earlier version's cursor (its position alone, as that version did). */
  readonly mark: Buffer | undefined;
  /** The feed's restart count when every event through it was found reflected here (-1: not yet). */
  vouched: number;
}

/** Dependencies of {@link RevocationCatchUp}. */
export interface RevocationCatchUpDeps {
  feed: RevocationFeed;
  events: RevocationEventRepository;
  /** Where the state cache is (its `evictState` empties it; absent on SQLite, whose cache every write empties first). */
  sql: Pick<SqlRunner, "evictState">;
  /** The bound of one catch-up (default {@link CATCH_UP_MS}). */
  timeoutMs?: number;
}

/**
 * What position in the revocation feed this instance's caches have applied, and the way
 * to catch up with a position a caller already heard of (VerifyCredential's
 * `min_revocation_position`, the causality token of a downstream watching another instance).
 *
 * Why it is needed: on PostgreSQL an instance's state cache is emptied by the notification
 * of each change, which reaches the instances one by one. The instance whose feed delivered
 * a revocation to a downstream client may have heard of it before the instance that client
 * asks next; that one would answer from the row it kept, VALID, and the client would cache it.
 *
 * What it claims: {@link applied} is P only once every event with id <= P was read from the
 * database (so it had committed) and the state cache was emptied after that read. Every
 * read of state that starts later sees those commits; a read that was in flight then is not
 * kept (the cache's epoch). The feed's own reads raise it (each batch read empties the cache:
 * a batch comes of writes that empty it anyway), and a caller ahead of it makes the instance
 * read the feed's newest id itself, one query, then empty the cache (concurrent callers
 * share the read).
 */
export class RevocationCatchUp {
  #applied = 0;
  #flight: Promise<void> | undefined;
  /** Reads of the newest id started (a call knows whether one began after it). */
  #reads = 0;
  /** The feed's restarts this instance has emptied its cache for. */
  #epoch = 0;
  readonly #opened = new Map<string, CaughtUpCursor>();
  /** The last events the feed read, by id: what a cursor's mark is checked against. */
  readonly #seen = new Map<number, FeedAnchor>();
  /** Marks of events caught up with by a read of this instance's own (any cursor naming one costs nothing). */
  readonly #caughtUp = new Map<number, Buffer>();
  readonly #timeoutMs: number;

  constructor(private readonly deps: RevocationCatchUpDeps) {
    this.#timeoutMs = deps.timeoutMs ?? CATCH_UP_MS;
    deps.feed.subscribe((batch) => {
      for (const e of batch.events) keep(this.#seen, e.id, e);
      this.#reached(batch.position);
    });
    deps.feed.onLost(() => {
      if (deps.feed.restarts !== this.#epoch) {
        // The feed restarted: its ids went back (a restore), and the restore's commit may have
        // changed state this cache kept (no notification of it needs to have come). Emptied, and
        // only the feed's own position is claimed: ids at or below the old one are drawn again.
        this.#epoch = deps.feed.restarts;
        this.#seen.clear();
        this.#caughtUp.clear();
        this.deps.sql.evictState?.();
        this.#applied = deps.feed.position;
        return;
      }
      // It stopped vouching: what was claimed past its position is claimed no more.
      this.#applied = Math.min(this.#applied, deps.feed.position);
    });
  }

  /** The id through which every revocation event is reflected in this instance's caches. */
  get applied(): number {
    return this.#applied;
  }

  /**
   * The cursor (a WatchRevocations cursor: VerifyCredential's `min_revocation_position`) when
   * this instance must first catch up with it ({@link catchUp}), or undefined when every event
   * it names is reflected here already: its position is applied and its mark is that of the
   * event this feed read at that id (or it was caught up with, in this epoch of the feed).
   * Opened cursors are kept (a caller sends the same one until its next event: opening it is
   * AES-GCM). Throws INVALID_ARGUMENT for a cursor this deployment did not issue.
   */
  behind(cursor: string): CaughtUpCursor | undefined {
    let kept = this.#opened.get(cursor);
    if (kept === undefined) {
      const opened = this.deps.feed.cursors.open(cursor);
      if (opened === undefined)
        throw errors.invalidArgument(
          "min_revocation_position is not a cursor of this deployment's revocation feed",
          "min_revocation_position",
        );
      if (this.#opened.size >= KEPT_CURSORS) this.#opened.clear();
      kept = { position: opened.position, mark: opened.mark && own(opened.mark), vouched: -1 };
      this.#opened.set(cursor, kept);
    }
    if (kept.vouched === this.#epoch) return undefined;
    if (kept.position > this.#applied) return kept;
    // Applied, if the event at that id is the one the caller was sent: after a restore the
    // feed this instance read and the caller's are two, until this one reads past it.
    if (kept.mark !== undefined && !this.#known(kept.position, kept.mark)) return kept;
    kept.vouched = this.#epoch;
    return undefined;
  }

  /** Whether the feed read, at `position`, the event `mark` is of. */
  #known(position: number, mark: Buffer): boolean {
    const feed = this.deps.feed;
    if (this.#caughtUp.get(position)?.equals(mark)) return true;
    const anchor = position === feed.position ? feed.anchor : this.#seen.get(position);
    if (anchor === undefined && position !== 0) return false;
    return markOf(anchor).equals(mark);
  }

  /**
   * Resolves once every event through `cursor` is reflected here: the feed's newest id read by
   * a query that started after this call, and the cache emptied after it (a cursor whose mark
   * this instance does not know makes one such read even when its position is applied, and
   * wakes the feed, which then sees whether its ids went back). From then on the cursor costs
   * nothing (one above the newest id, left by a restore, included). Rejects UNAVAILABLE past
   * `timeoutMs` (at most {@link CATCH_UP_MS}) or when the database cannot be read: never an
   * answer that may predate the event.
   */
  catchUp(cursor: CaughtUpCursor, timeoutMs = this.#timeoutMs): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(behind()), Math.min(timeoutMs, this.#timeoutMs));
      timer.unref();
    });
    return Promise.race([this.#until(cursor), late]).finally(() => clearTimeout(timer));
  }

  async #until(cursor: CaughtUpCursor): Promise<void> {
    const asked = this.#reads;
    const epoch = this.#epoch;
    const unknown = cursor.position <= this.#applied;
    if (unknown) this.deps.feed.wake();
    while (unknown || this.#applied < cursor.position) {
      // A read already running may have started before the caller's event committed: it
      // is joined, and once it is over, a read of this call's own (shared with later callers) decides.
      const flight = this.#flight ?? this.#start();
      const started = this.#reads;
      await flight;
      // Read since this call began: every event the caller was sent had committed by then,
      // and the cache was emptied after it. A position still above is none the feed holds
      // (its ids went back: a restore); the state read from now on is the database's own.
      if (started > asked) break;
    }
    if (cursor.mark !== undefined && this.#epoch === epoch)
      keep(this.#caughtUp, cursor.position, cursor.mark);
    cursor.vouched = this.#epoch;
  }

  /** One read of the newest event id, shared by the callers waiting meanwhile. */
  #start(): Promise<void> {
    this.#reads++;
    const epoch = this.#epoch;
    const flight = this.deps.events.lastId().then(
      (newest) => {
        // Emptied even when the newest id is no news (a position past it names no event of
        // this feed: its ids went back), so that what the caller reads next is read anew.
        this.deps.sql.evictState?.();
        // A read begun before the feed restarted answers the old timeline's id: claimed, it
        // would vouch for ids the new timeline draws again before this instance read them.
        if (this.#epoch === epoch) this.#applied = Math.max(this.#applied, newest);
      },
      () => {
        throw behind();
      },
    );
    const shared = flight.finally(() => {
      if (this.#flight === shared) this.#flight = undefined;
    });
    this.#flight = shared;
    return shared;
  }

  /** Every event through `position` has committed and was read: empty the cache, then claim it. */
  #reached(position: number): void {
    if (position <= this.#applied) return;
    this.deps.sql.evictState?.();
    this.#applied = position;
  }
}

/**
 * A copy of `bytes` in memory of its own: an opened cursor's mark is a view of a larger
 * buffer (8 KB: the pool's), which a kept mark would keep alive; `Buffer.alloc` never pools.
 */
function own(bytes: Buffer): Buffer {
  const copy = Buffer.alloc(bytes.length);
  bytes.copy(copy);
  return copy;
}

/** Set `key` in `map`, the oldest entries dropped past {@link KEPT_EVENTS}. */
function keep<V>(map: Map<number, V>, key: number, value: V): void {
  map.set(key, value);
  for (const old of map.keys()) {
    if (map.size <= KEPT_EVENTS) break;
    map.delete(old);
  }
}

/** The answer of an instance that cannot catch up with the feed in time. */
function behind(): TesseraError {
  return new TesseraError("UNAVAILABLE", "this instance has not yet applied the revocations asked for", {
    headers: { "retry-after": "1" },
  });
}
