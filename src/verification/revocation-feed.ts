import type { PgNotifier } from "../storage/pg-notify.js";
import type {
  RevocationEventRepository,
  RevocationRecord,
} from "../storage/repositories/revocation-events.js";
import { CursorCodec, sameEvent } from "./revocation-cursor.js";

/** Events read per query, by the feed and by a stream catching up from its cursor. */
export const FEED_PAGE = 500;

/**
 * How far behind the last proof that every commit was read the feed may be before its
 * streams stop vouching for their cursors: a loaded machine may delay a read, and that is
 * no outage.
 */
export const FRESH_MIN_MS = 3_000;

/** How often a PostgreSQL feed with open streams checks that it still vouches ({@link RevocationFeed.onLost}). */
const WATCHDOG_MS = 250;

/** Events handed to the open streams: every one after the previous batch's `position`, in order. */
export interface FeedBatch {
  events: readonly RevocationRecord[];
  /** The id of the last event read: every event up to it has been delivered. */
  position: number;
}

/** Options of {@link RevocationFeed}. */
export interface RevocationFeedOptions {
  events: RevocationEventRepository;
  /** PostgreSQL: this instance's listening session and the state channel (a change to any state table wakes the reader). */
  notifier?: PgNotifier;
  channel?: string;
  /** The poll: SQLite's, and PostgreSQL's while the listening session is down (also the retry after a failed read). */
  pollMs: number;
  /** Retention: events older than this are pruned, and beyond the newest `maxEvents`. */
  retentionSeconds: number;
  maxEvents: number;
  /** How often retention runs (default 60 s). */
  pruneIntervalMs?: number;
  logger: { warn(obj: object, msg: string): void; info(obj: object, msg: string): void };
  now?: () => number;
}

/** Counters of the feed and its streams (read by the metrics when scraped). */
export interface FeedStats {
  open: number;
  sent: number;
}

/**
 * The one reader of the revocation feed in an instance, fanning out to every open
 * WatchRevocations stream (never one query per stream). It keeps the id of the last event
 * it read and reads what follows when woken: on PostgreSQL by a notification on the state
 * channel (every change that makes an event changes a state table, whose trigger notifies
 * on commit, on every instance), and by a short poll only while that listening session is
 * down (a notification cannot be lost while it is up; on reconnecting it reads everything
 * after its position first); on SQLite by the poll and the writes themselves (app.ts).
 * Reads are coalesced: a wake during a read makes one more read after it.
 *
 * Ids become visible in order (the migration's triggers see to it), so "every event after
 * the last id read" is every event committed since, as long as that id still names the
 * event read: each read starts at it ({@link read}), so a feed whose ids went back (a
 * restore from a backup) is seen before anything after them is taken for new.
 */
export class RevocationFeed {
  /** The last event read (none: the feed was empty). */
  private last: RevocationRecord | undefined;
  private codec: CursorCodec | undefined;
  private readonly listeners = new Set<(batch: FeedBatch) => void>();
  private readonly drainHandlers = new Set<() => void>();
  private readonly lostHandlers = new Set<() => void>();
  private reading = false;
  private restartCount = 0;
  private again = false;
  private closed = false;
  private draining = false;
  private failing = false;
  private freshAt = 0;
  private readStartedAt = 0;
  private pollTimer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private pruneTimer: NodeJS.Timeout | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private readonly now: () => number;
  /** Streams open, per caller and in all. */
  private readonly openByCaller = new Map<string, number>();
  private readonly counters: FeedStats = { open: 0, sent: 0 };

  constructor(private readonly options: RevocationFeedOptions) {
    this.now = options.now ?? Date.now;
  }

  /** Read this database's feed id and position; subscribe to notifications (before the notifier starts). */
  async start(): Promise<void> {
    const info = await this.options.events.info();
    const { notifier, channel } = this.options;
    if (notifier) {
      // Ids follow commit order only if each is drawn at the commit, one at a time (see the migration).
      const found = await this.options.events.idCache();
      if (!found)
        throw new Error(
          "no sequence of revocation_events.id found (neither owned by the column nor named by its default as " +
            "nextval('…'::regclass)): the start cannot check that event ids follow commit order; restore the " +
            "column's default, or run `alter sequence <its sequence> owned by revocation_events.id`",
        );
      const { sequence, cache } = found;
      if (cache !== 1)
        throw new Error(
          `the sequence ${sequence} of revocation_events caches ${cache} ids per session: event ids would not ` +
            `follow commit order and WatchRevocations could skip revocations; run \`alter sequence ${sequence} cache 1\``,
        );
    }
    this.codec = new CursorCodec(info.databaseId);
    this.last = await this.options.events.newest();
    this.freshAt = this.now();
    if (notifier && channel) {
      notifier.subscribe(channel, () => this.wake());
      notifier.onStatus((online) => {
        if (online) this.stopPolling();
        else {
          // Every commit before the session's last proof was notified and read (or is being
          // read): vouched for so far, not up to now (a session cut off without a reset is
          // found lost only when its keepalive times out, and heard nothing meanwhile).
          this.freshAt = Math.max(this.freshAt, this.heardUntil(notifier));
          this.startPolling();
        }
        // Online: what was committed while the session was down, before the notifications resume.
        this.wake();
      });
    }
    if (!this.listening) this.startPolling();
    if (notifier) {
      // Streams of an instance that can no longer vouch end at once (their clients empty the
      // caches they keep while a stream is up), not only when their next heartbeat is due.
      this.watchdog = setInterval(() => {
        if (this.lostHandlers.size > 0 && !this.vouching()) for (const fn of [...this.lostHandlers]) fn();
      }, WATCHDOG_MS);
      this.watchdog.unref();
    }
    // Each minute a read too: a restore that announced nothing (no notification, no reconnection) is seen.
    this.pruneTimer = setInterval(() => {
      void this.prune();
      this.wake();
    }, this.options.pruneIntervalMs ?? 60_000);
    this.pruneTimer.unref();
    void this.prune();
  }

  /** Whether a notification announces every commit now (PostgreSQL's listening session is up). */
  private get listening(): boolean {
    return this.options.notifier?.online === true && this.options.channel !== undefined;
  }

  private startPolling(): void {
    if (this.pollTimer || this.closed) return;
    this.pollTimer = setInterval(() => this.wake(), this.options.pollMs);
    this.pollTimer.unref();
  }

  private stopPolling(): void {
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.pollTimer = undefined;
  }

  /** The cursor codec of this database (after {@link start}). */
  get cursors(): CursorCodec {
    if (!this.codec) throw new Error("the revocation feed is not started");
    return this.codec;
  }

  /** The id of the last event read. */
  get position(): number {
    return this.last?.id ?? 0;
  }

  /** How often the feed found its ids went back and started over from the newest event (a restore). */
  get restarts(): number {
    return this.restartCount;
  }

  /** The last event read (none: the feed was empty), whose cursor a stream starting now is given. */
  get anchor(): RevocationRecord | undefined {
    return this.last;
  }

  /**
   * Whether every event committed until `withinMs` ago has been read (a stream that cannot
   * vouch for the feed stops heartbeating). Listening, nothing is owed but what a read in
   * progress reads, and what the session may not have heard since it last answered a query
   * (a partition without a reset: notifications stop, and nothing tells this process yet).
   */
  fresh(withinMs: number): boolean {
    if (this.failing) return false;
    const notifier = this.options.notifier;
    const until =
      this.listening && notifier ? Math.max(this.freshAt, this.heardUntil(notifier)) : this.freshAt;
    return this.now() - until <= withinMs;
  }

  /**
   * Whether streams may stay open: always on SQLite (its poll cannot be cut off from the
   * database it reads); on PostgreSQL while {@link fresh} within {@link FRESH_MIN_MS}.
   */
  vouching(): boolean {
    return this.options.notifier === undefined || this.fresh(FRESH_MIN_MS);
  }

  /**
   * The instant (this.now's clock) before which every commit was notified to this
   * instance and read: the send time of the last query the session answered, or, with a
   * read in progress, when that read began if earlier.
   */
  private heardUntil(notifier: PgNotifier): number {
    const proven = this.now() - notifier.provenAgoMs;
    return this.reading ? Math.min(proven, this.readStartedAt) : proven;
  }

  get isDraining(): boolean {
    return this.draining;
  }

  /** Receive every batch read from now on; returns the unsubscribe function. */
  subscribe(fn: (batch: FeedBatch) => void): () => void {
    this.listeners.add(fn);
    return () => {
      this.listeners.delete(fn);
    };
  }

  /** Be told when a PostgreSQL feed stops vouching ({@link vouching}): its streams end, Unavailable. */
  onLost(fn: () => void): () => void {
    this.lostHandlers.add(fn);
    return () => {
      this.lostHandlers.delete(fn);
    };
  }

  /** Be told when the server starts shutting down (streams end cleanly then). */
  onDrain(fn: () => void): () => void {
    this.drainHandlers.add(fn);
    return () => {
      this.drainHandlers.delete(fn);
    };
  }

  /**
   * Count a stream of `caller` in; false when the caller has `perCaller` open already, or
   * the instance `total` (0: no bound). Pair with {@link release}.
   */
  admit(caller: string, perCaller: number, total: number): boolean {
    const mine = this.openByCaller.get(caller) ?? 0;
    if ((perCaller > 0 && mine >= perCaller) || (total > 0 && this.counters.open >= total)) return false;
    this.openByCaller.set(caller, mine + 1);
    this.counters.open++;
    return true;
  }

  release(caller: string): void {
    const mine = (this.openByCaller.get(caller) ?? 1) - 1;
    if (mine <= 0) this.openByCaller.delete(caller);
    else this.openByCaller.set(caller, mine);
    this.counters.open--;
  }

  /** Count events sent on a stream. */
  countSent(n: number): void {
    this.counters.sent += n;
  }

  stats(): FeedStats {
    return { ...this.counters };
  }

  /** Read what was committed since the last read (coalesced). */
  wake(): void {
    if (this.closed || !this.codec) return;
    if (this.reading) {
      this.again = true;
      return;
    }
    void this.read();
  }

  /** Shutdown has begun: every open stream ends now (cleanly; clients resume elsewhere from their cursor). */
  drain(): void {
    this.draining = true;
    for (const fn of [...this.drainHandlers]) fn();
  }

  close(): void {
    this.closed = true;
    this.drain();
    this.stopPolling();
    clearInterval(this.pruneTimer);
    clearInterval(this.watchdog);
    clearTimeout(this.retryTimer);
  }

  private async read(): Promise<void> {
    this.reading = true;
    try {
      do {
        this.again = false;
        this.readStartedAt = this.now();
        for (;;) {
          const last = this.last;
          // From the last event read on, that one included: still there as read, nothing was missed.
          const rows = await this.options.events.from(last?.id ?? 0, FEED_PAGE + (last ? 1 : 0));
          const events = last ? rows.slice(rows[0]?.id === last.id ? 1 : 0) : rows;
          if (last && !sameEvent(rows[0], last) && !(await this.prunedExactly(last, rows[0]))) {
            await this.restart(last);
            break;
          }
          if (events.length > 0) {
            this.last = events[events.length - 1]!;
            const batch: FeedBatch = { events, position: this.last.id };
            for (const fn of this.listeners) fn(batch);
          }
          if (events.length < FEED_PAGE) break;
        }
        // What was committed before the read began has been read (not what came during it).
        this.freshAt = Math.max(this.freshAt, this.readStartedAt);
        if (this.failing) this.options.logger.info({}, "revocation feed: reading again");
        this.failing = false;
      } while (this.again && !this.closed);
    } catch (err) {
      if (this.closed) return;
      if (!this.failing)
        this.options.logger.warn({ err: (err as Error).message }, "revocation feed: cannot read; retrying");
      this.failing = true;
      // No poll runs while listening: the retry is this timer's (a notification may come first).
      if (!this.pollTimer && !this.retryTimer) {
        this.retryTimer = setTimeout(() => {
          this.retryTimer = undefined;
          this.wake();
        }, this.options.pollMs);
        this.retryTimer.unref();
      }
    } finally {
      this.reading = false;
    }
  }

  /**
   * Whether the last event read is gone only because retention deleted it, and nothing after
   * it: the mark (raised before the delete, so read after the rows) is its id. A mark below
   * it means the feed's ids went back; above it, events this reader never read were deleted.
   */
  private async prunedExactly(last: RevocationRecord, first: RevocationRecord | undefined): Promise<boolean> {
    if (first?.id === last.id) return false;
    return (await this.options.events.info()).prunedThrough === last.id;
  }

  /**
   * The last event read is no longer what it was: the feed's ids went back (restored from a
   * backup, its events and id sequence where the backup left them), so what commits now
   * takes ids this reader read past; or retention deleted events before it read them.
   * Either way no stream can be sent what it missed: every stream ends (its client resumes
   * from its cursor, whose event is gone or another now: answered `reset`, it empties its
   * cache) and the reader goes on from the newest event.
   */
  private async restart(last: RevocationRecord): Promise<void> {
    const newest = await this.options.events.newest();
    this.options.logger.warn(
      { from: last.id, to: newest?.id ?? 0 },
      "revocation feed: the last event read is gone (its ids went back: restored from a backup?); ending every stream",
    );
    this.last = newest;
    this.restartCount++;
    for (const fn of [...this.lostHandlers]) fn();
  }

  private async prune(): Promise<void> {
    if (this.closed) return;
    try {
      const before = new Date(this.now() - this.options.retentionSeconds * 1000);
      await this.options.events.prune(before, this.options.maxEvents);
    } catch (err) {
      this.options.logger.warn(
        { err: (err as Error).message },
        "revocation feed: retention failed; retrying later",
      );
    }
  }
}
