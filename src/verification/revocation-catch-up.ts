import { errors, TesseraError } from "../errors.js";
import type {
  RevocationEventRepository,
  RevocationRecord,
} from "../storage/repositories/revocation-events.js";
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
 * one costs two reads by primary key (and, only when they do not match, a read of the newest
 * event and an emptied state cache). A cursor names one of the last few, as a rule; kept deep
 * so that the reads are rare (a few MB at most: an event's fields, or an 8-byte mark).
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

/** What {@link RevocationCatchUp.applied} was claimed at: an id, and the mark of the event read there (zeros: none). */
interface Claim {
  readonly id: number;
  readonly mark: Buffer;
}

/**
 * A read of the event at one id, shared by the callers that need it: `seq` numbers its start
 * among the others, `done` is how many had started when its answer came (-1: not yet).
 */
interface EventRead {
  readonly seq: number;
  done: number;
  readonly read: Promise<RevocationRecord | undefined>;
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
 * read the feed's newest event itself, one query, then empty the cache (concurrent callers
 * share the read). Each claim keeps the event it was made at ({@link Claim}): a cursor at an
 * applied position whose event this instance no longer remembers is settled by reading that
 * event and the claim's back ({@link #confirmed}), without emptying the cache.
 */
export class RevocationCatchUp {
  #applied: Claim = { id: 0, mark: markOf(undefined) };
  #flight: Promise<void> | undefined;
  /** Reads of the newest event started (a call knows whether one began after it). */
  #reads = 0;
  /** The feed's restarts this instance has emptied its cache for. */
  #epoch = 0;
  /** Reads of the event at an id in flight, by id; `#eventReads` counts those started. */
  readonly #inFlight = new Map<number, EventRead>();
  #eventReads = 0;
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
      const last = batch.events.at(-1);
      if (last?.id === batch.position) this.#reached(last);
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
        this.#claim(deps.feed.anchor);
        return;
      }
      // It stopped vouching: what was claimed past its position is claimed no more.
      if (deps.feed.position < this.#applied.id) this.#claim(deps.feed.anchor);
    });
  }

  /** The id through which every revocation event is reflected in this instance's caches. */
  get applied(): number {
    return this.#applied.id;
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
    // Caught up with in this epoch of the feed, whichever string names it: a position past the
    // newest id (left by a restore) comes in a new string with each message, and the strings
    // kept are few.
    if (kept.mark !== undefined && this.#caughtUp.get(kept.position)?.equals(kept.mark)) {
      kept.vouched = this.#epoch;
      return undefined;
    }
    if (kept.position > this.#applied.id) return kept;
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
    if (position === this.#applied.id && this.#applied.mark.equals(mark)) return true;
    const anchor = position === feed.position ? feed.anchor : this.#seen.get(position);
    if (anchor === undefined && position !== 0) return false;
    return markOf(anchor).equals(mark);
  }

  /**
   * Resolves once every event through `cursor` is reflected here: the feed's newest event read
   * by a query that started after this call, and the cache emptied after it. A cursor at an
   * applied position whose mark this instance does not know is settled by {@link #confirmed}
   * when it can be; when not, it makes one such read too, and wakes the feed, which then sees
   * whether its ids went back. From then on the cursor costs nothing (one above the newest id,
   * left by a restore, included). Rejects UNAVAILABLE past `timeoutMs` (at most
   * {@link CATCH_UP_MS}) or when the database cannot be read: never an answer that may
   * predate the event.
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
    const claim = this.#applied;
    const unknown = cursor.position <= claim.id;
    const { mark } = cursor;
    const confirmed = unknown && mark !== undefined && (await this.#confirmed(cursor.position, mark, claim));
    // Unless withdrawn meanwhile (the feed restarted, or stopped vouching below it): then caught up with as before.
    if (confirmed && mark !== undefined && this.#epoch === epoch && cursor.position <= this.#applied.id) {
      keep(this.#caughtUp, cursor.position, mark);
      cursor.vouched = epoch;
      return;
    }
    if (unknown) this.deps.feed.wake();
    while (unknown || this.#applied.id < cursor.position) {
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

  /**
   * Whether the event `mark` is of is at `position` on the database now, and so is the event
   * `claim` was made at: the caller's event is then one this instance read (a restore since
   * the claim would have taken its id back, drawing it again for another event or none), and
   * reflected here as every other up to the claim. Read in that order, each by a query begun
   * after the one before it ended: both hold at the second's instant, between the claim's and now.
   */
  async #confirmed(position: number, mark: Buffer, claim: Claim): Promise<boolean> {
    const caller = await this.#eventAt(position, this.#eventReads);
    if (caller.event === undefined ? !(await this.#pruned(position)) : !markOf(caller.event).equals(mark))
      return false;
    return markOf((await this.#eventAt(claim.id, caller.done)).event).equals(claim.mark);
  }

  /**
   * Whether retention deleted the event at `position` (read after finding none there): the
   * claim's event, read next, then settles it alone. Unchanged, no id at or below it went back
   * since the claim, so the caller's event was reflected by the claim, or was of a timeline the
   * database had left before it. Without this, any cursor older than the retention cost a flush.
   */
  async #pruned(position: number): Promise<boolean> {
    const info = await this.deps.events.info().catch(() => {
      throw behind();
    });
    return position <= info.prunedThrough;
  }

  /**
   * The event at `id` (none: undefined), read by a query that began once `after` reads had
   * begun: one in flight that began earlier is waited out, and one begun since, by any caller,
   * is shared. Rejects UNAVAILABLE when the database cannot be read.
   */
  async #eventAt(id: number, after: number): Promise<{ event: RevocationRecord | undefined; done: number }> {
    for (;;) {
      const flight = this.#inFlight.get(id) ?? this.#readEvent(id);
      const event = await flight.read;
      if (flight.seq > after) return { event, done: flight.done };
    }
  }

  #readEvent(id: number): EventRead {
    const flight: EventRead = {
      seq: ++this.#eventReads,
      done: -1,
      read: this.deps.events
        .at(id)
        .catch(() => {
          throw behind();
        })
        .finally(() => {
          flight.done = this.#eventReads;
          if (this.#inFlight.get(id) === flight) this.#inFlight.delete(id);
        }),
    };
    this.#inFlight.set(id, flight);
    return flight;
  }

  /** One read of the newest event, shared by the callers waiting meanwhile. */
  #start(): Promise<void> {
    this.#reads++;
    const epoch = this.#epoch;
    const flight = this.deps.events.newest().then(
      (newest) => {
        // Emptied even when the newest event is no news (a position past it names no event of
        // this feed: its ids went back), so that what the caller reads next is read anew.
        this.deps.sql.evictState?.();
        // A read begun before the feed restarted answers the old timeline's event: claimed, it
        // would vouch for ids the new timeline draws again before this instance read them.
        if (this.#epoch === epoch && (newest?.id ?? 0) > this.#applied.id) this.#claim(newest);
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

  /** Every event through `last` has committed and was read: empty the cache, then claim it. */
  #reached(last: FeedAnchor): void {
    if (last.id <= this.#applied.id) return;
    this.deps.sql.evictState?.();
    this.#claim(last);
  }

  /** Claim every event through `anchor` (none: an empty feed) as applied, keeping the event's mark. */
  #claim(anchor: FeedAnchor | undefined): void {
    this.#applied = { id: anchor?.id ?? 0, mark: markOf(anchor) };
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
