import { errors, TesseraError } from "../errors.js";
import type { RevocationEventRepository } from "../storage/repositories/revocation-events.js";
import type { SqlRunner } from "../storage/sql.js";
import type { RevocationFeed } from "./revocation-feed.js";

/** How long a verification waits for its instance to catch up with the feed before Unavailable. */
export const CATCH_UP_MS = 2_000;

/** Cursors opened and kept (a caller sends one until its next event): past it the map starts over. */
const KEPT_CURSORS = 1_024;

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
  readonly #opened = new Map<string, number>();
  readonly #timeoutMs: number;

  constructor(private readonly deps: RevocationCatchUpDeps) {
    this.#timeoutMs = deps.timeoutMs ?? CATCH_UP_MS;
    deps.feed.subscribe((batch) => this.#reached(batch.position));
    // The feed restarted (its ids went back: a restore) or stopped vouching: what was claimed
    // past its position is claimed no more (ids below it may be drawn again, for new events).
    deps.feed.onLost(() => {
      this.#applied = Math.min(this.#applied, deps.feed.position);
    });
  }

  /** The id through which every revocation event is reflected in this instance's caches. */
  get applied(): number {
    return this.#applied;
  }

  /**
   * The feed position `cursor` (a WatchRevocations cursor) names, remembered per cursor (a
   * caller sends the same one until its next event: opening it is AES-GCM); throws
   * INVALID_ARGUMENT for a cursor this deployment did not issue.
   */
  positionOf(cursor: string): number {
    const kept = this.#opened.get(cursor);
    if (kept !== undefined) return kept;
    const opened = this.deps.feed.cursors.open(cursor);
    if (opened === undefined)
      throw errors.invalidArgument(
        "min_revocation_position is not a cursor of this deployment's revocation feed",
        "min_revocation_position",
      );
    if (this.#opened.size >= KEPT_CURSORS) this.#opened.clear();
    this.#opened.set(cursor, opened.position);
    return opened.position;
  }

  /**
   * Resolves once every event through `position` (the caller checked {@link applied} is
   * below it) is reflected here: the feed's newest id read by a query that started after
   * this call, and the cache emptied after it. Rejects UNAVAILABLE past the bound or when
   * the database cannot be read: never an answer that may predate the event.
   */
  catchUp(position: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(behind()), this.#timeoutMs);
      timer.unref();
    });
    return Promise.race([this.#until(position), late]).finally(() => clearTimeout(timer));
  }

  async #until(position: number): Promise<void> {
    const asked = this.#reads;
    while (this.#applied < position) {
      // A read already running may have started before the caller's event committed: it
      // is joined, and once it is over, a read of this call's own (shared with later callers) decides.
      const flight = this.#flight ?? this.#start();
      const started = this.#reads;
      await flight;
      // Read since this call began: every event the caller was sent had committed by then,
      // and the cache was emptied after it. A position still above is none the feed holds
      // (its ids went back: a restore); the state read from now on is the database's own.
      if (started > asked) return;
    }
  }

  /** One read of the newest event id, shared by the callers waiting meanwhile. */
  #start(): Promise<void> {
    this.#reads++;
    const flight = this.deps.events.lastId().then(
      (newest) => {
        // Emptied even when the newest id is no news (a position past it names no event of
        // this feed: its ids went back), so that what the caller reads next is read anew.
        this.deps.sql.evictState?.();
        this.#applied = Math.max(this.#applied, newest);
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

/** The answer of an instance that cannot catch up with the feed in time. */
function behind(): TesseraError {
  return new TesseraError("UNAVAILABLE", "this instance has not yet applied the revocations asked for", {
    headers: { "retry-after": "1" },
  });
}
