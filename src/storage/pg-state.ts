// The PostgreSQL state cache: rows of authentication state kept per statement, emptied by the
// triggers' notifications, with the write barrier that makes a change exact on every instance.
import { setTimeout as sleep } from "node:timers/promises";
import type { Awaitable } from "../auth/awaitable.js";
import type { PgNotifier } from "./pg-notify.js";
import { ANNOUNCED, NOTIFY_TRIGGER, TRIGGER_CHECK_MS } from "./pg-state-channel.js";
import { RowBuckets, STATE_TABLES, type StateCacheStats } from "./row-cache.js";

const WATCHED: ReadonlySet<string> = new Set<string>(STATE_TABLES);

/** Payload prefixes of the write barrier (table names never start with "~"). */
const BARRIER = "~b:";
const ACK = "~a:";

/**
 * Resolves once `ms` have passed since `from` (`performance.now()`) by that clock: a timer
 * alone may fire early by as long as the event loop's turn that set it had run.
 */
async function elapsed(from: number, ms: number): Promise<"timeout"> {
  for (let left = from + ms - performance.now(); left > 0; left = from + ms - performance.now())
    await sleep(Math.ceil(left), undefined, { ref: false });
  return "timeout";
}

/** Options of {@link PgStateCache}. */
export interface PgStateCacheOptions {
  /** Entries per cached statement; 0: nothing is cached (the barrier still runs, for the other instances). */
  perStatement: number;
  /** The schema's channel ({@link stateChannel}). */
  channel: string;
  /**
   * How long a write waits for its barrier: its own notification back on this instance's
   * listener and the acknowledgements of the other instances' listeners (default 1,000 ms).
   */
  barrierTimeoutMs?: number;
  /** Period of the trigger re-check while running (default {@link TRIGGER_CHECK_MS}); tests shorten it. */
  triggerCheckMs?: number;
  /** Send a notification through the pool (autocommit): `select pg_notify(channel, payload)`. */
  notify(channel: string, payload: string): Promise<void>;
  /** Backend pids of the other instances' listening sessions on this schema (`pg_stat_activity`). */
  peers(ownPid: number): Promise<number[]>;
  /** Of `pids`, those whose sessions still exist. */
  alive(pids: number[]): Promise<number[]>;
  /** End the sessions `pids` (`pg_terminate_backend`): their instances then stop trusting their caches. */
  terminate(pids: number[]): Promise<void>;
  /** Announced tables ({@link ANNOUNCED_TABLES}) lacking their enabled notify trigger. */
  missingTriggers(): Promise<string[]>;
  logger?: {
    info?(obj: object, msg: string): void;
    warn(obj: object, msg: string): void;
    error?(obj: object, msg: string): void;
  };
}

/**
 * PostgreSQL's state cache: authentication state answered from memory while this
 * instance's listening session ({@link PgNotifier}) is online, and emptied by every
 * notification of the schema's state channel, so that an authenticated call at steady
 * state sends no query while a change made by any instance is never served stale.
 *
 * Why it is exact:
 * - Every committed change to a state table sends a NOTIFY from a trigger, in its own
 *   transaction (the ORM, raw SQL, psql alike); rolled-back writes send none.
 * - The cache is used only while the listener is online. Going offline (error, `end`,
 *   `pg_terminate_backend`, a keepalive unanswered) turns it off at once (every read goes to
 *   the database) and coming back online empties it: a notification missed meanwhile
 *   cannot leave an entry alive.
 * - Nor while the session has not proven itself for `barrierTimeoutMs` (no answer to a
 *   query sent that recently; the keepalive asks at least four times per bound): a session cut off
 *   without a reset (a partition that drops packets) looks online here until its keepalive
 *   times out, while another instance's barrier, hearing nothing from it, ends it and
 *   returns after that bound; by then this instance no longer trusts its cache.
 * - A read that was in flight while the cache was emptied is not kept (an epoch counter):
 *   it may have read the row before the change that emptied it committed.
 * - A write on this instance does not return before its barrier (see {@link barrier}): its
 *   own notification came back here, and every other instance listening on the schema has
 *   acknowledged it (so emptied its cache), or has had its listening session ended.
 *   The barrier runs after the commit, from the connection hook of {@link installWriteHook},
 *   which every write of the ORM and of `SqlRunner.run` goes through.
 */
export class PgStateCache {
  private readonly rows: RowBuckets;
  private epoch = 0;
  private seq = 0;
  /** Barrier tokens awaited, with what is still missing. */
  private readonly waiting = new Map<string, { own: boolean; peers: Set<number>; done: () => void }>();
  private readonly timeoutMs: number;
  /** Whether the last trigger check found every announced table's trigger (false until one has). */
  private triggersOk = false;
  private missing: string[] = [];
  /** Trigger checks started; a result is used only if no later check started since. */
  private checks = 0;
  private missingReported = false;
  private retryTimer: NodeJS.Timeout | null = null;
  private readonly triggerCheckMs: number;

  constructor(
    private readonly notifier: PgNotifier,
    private readonly options: PgStateCacheOptions,
  ) {
    this.rows = new RowBuckets(options.perStatement);
    this.timeoutMs = options.barrierTimeoutMs ?? 1_000;
    this.triggerCheckMs = options.triggerCheckMs ?? TRIGGER_CHECK_MS;
    notifier.subscribe(options.channel, (payload) => this.onNotification(payload));
    let first = true;
    notifier.onStatus((online) => {
      this.invalidate();
      // Back online after a loss: the triggers may have changed meanwhile (a table rebuilt
      // by a restore, a migration): checked again, cache off until then. The first time,
      // the check of start-up (checkTriggers, awaited before serving) stands.
      if (online && !first) void this.checkTriggers();
      if (online) first = false;
    });
  }

  /**
   * Whether answers may come from memory now: the listening session online and proven
   * alive within the barrier's bound (see {@link barrier}: a write of another instance
   * that could not hear from this one returns only after that bound, by which time a
   * session that stopped answering has stopped being trusted here).
   */
  get enabled(): boolean {
    return this.options.perStatement > 0 && this.triggersOk && this.notifier.provenWithin(this.timeoutMs);
  }

  /**
   * Check that every announced table has its notify triggers: without them, a change to
   * that table would empty no cache, so the cache is refused (every read goes to the
   * database, which stays exact) until a later check finds them all. Missing triggers are
   * logged as an error once per episode and counted in {@link stats}. A check that cannot
   * run (the database away) leaves the cache off and is tried again a second later.
   * Checked at start, when the listener comes back, and every `triggerCheckMs` (5 s) while
   * running: a trigger dropped or disabled by hand on a live database turns the cache off
   * within that period (changes made in between were not announced: the window is the
   * period, and only a DDL event trigger, which needs a superuser, could close it).
   * Why not refuse to start: the service stays correct without the cache, only slower, and
   * an operator who dropped a trigger by mistake should get an alarm, not an outage.
   * @param periodic a routine re-check: the cache stays on while it runs
   */
  async checkTriggers(periodic = false): Promise<void> {
    const run = ++this.checks;
    if (!periodic) this.triggersOk = false;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    let missing: string[];
    try {
      missing = await this.options.missingTriggers();
    } catch {
      if (run === this.checks) this.schedule(periodic ? this.triggerCheckMs : 1_000, periodic);
      return;
    }
    if (run !== this.checks) return;
    this.missing = missing;
    if (missing.length > 0) {
      this.triggersOk = false;
      this.invalidate();
      if (!this.missingReported)
        (this.options.logger?.error ?? this.options.logger?.warn)?.call(
          this.options.logger,
          { tables: missing, trigger: NOTIFY_TRIGGER },
          "state cache off: tables lack the triggers that announce their changes (re-run the statements of the migrations Migration20261204230000_state_notify and Migration20261205030000_notify_always, or restore the triggers); reading through",
        );
      this.missingReported = true;
      this.schedule(this.triggerCheckMs, true);
      return;
    }
    this.schedule(this.triggerCheckMs, true);
    if (periodic && this.triggersOk) return;
    if (this.missingReported)
      this.options.logger?.info?.({}, "state cache on: every announced table has its triggers again");
    this.missingReported = false;
    // Nothing was kept while off; emptied anyway, for reads that were in flight.
    this.invalidate();
    this.triggersOk = true;
  }

  /** The next trigger check in `ms` (unref'd: it never keeps the process alive). */
  private schedule(ms: number, periodic: boolean): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    // A closed app's cache checks nothing more (its pool is gone too).
    if (this.notifier.isClosed) return;
    this.retryTimer = setTimeout(() => void this.checkTriggers(periodic), ms);
    this.retryTimer.unref();
  }

  /**
   * The kept answer, synchronously (counted as a hit); otherwise a promise of `load`'s, kept
   * only if nothing emptied the cache while it was read (it may predate that change).
   */
  read<T>(sql: string, params: readonly unknown[], load: () => Promise<T>): Awaitable<T> {
    if (!this.enabled) {
      this.rows.counters.misses++;
      return load();
    }
    const hit = this.rows.get<T>(sql, params);
    if (hit !== undefined) return hit;
    this.rows.counters.misses++;
    const epoch = this.epoch;
    return load().then((value) => {
      if (epoch === this.epoch && this.enabled) this.rows.set(sql, params, value);
      return value;
    });
  }

  stats(): StateCacheStats {
    return { enabled: this.enabled, ...this.rows.counters, triggersMissing: this.missing.length };
  }

  /** Empty the cache now, as a notification does (reads in flight are not kept). */
  evict(): void {
    this.invalidate();
  }

  private invalidate(): void {
    this.epoch++;
    this.rows.clear();
  }

  private onNotification(payload: string): void {
    if (payload.startsWith(BARRIER)) {
      const token = payload.slice(BARRIER.length);
      const mine = this.waiting.get(token);
      if (mine) {
        mine.own = false;
        this.settle(token);
        return;
      }
      // Another instance's barrier: everything before it in the queue has been handled
      // here (notifications arrive in commit order), so acknowledge it.
      const me = this.notifier.backendPid;
      if (me !== null)
        this.options.notify(this.options.channel, `${ACK}${token}:${me}`).catch(() => undefined);
      return;
    }
    if (payload.startsWith(ACK)) {
      const rest = payload.slice(ACK.length);
      const cut = rest.lastIndexOf(":");
      const token = rest.slice(0, cut);
      const entry = this.waiting.get(token);
      if (entry) {
        entry.peers.delete(Number(rest.slice(cut + 1)));
        this.settle(token);
      }
      return;
    }
    // A table name. signing_keys is announced for the key work; it is no state the cache holds.
    if (WATCHED.has(payload) || !ANNOUNCED.has(payload)) this.invalidate();
  }

  private settle(token: string): void {
    const entry = this.waiting.get(token);
    if (entry && !entry.own && entry.peers.size === 0) {
      this.waiting.delete(token);
      entry.done();
    }
  }

  /**
   * Wait until a write that committed is reflected by every instance's cache: a barrier
   * notification is sent after the commit; PostgreSQL delivers notifications in commit
   * order, so once this instance's listener receives its own barrier it has handled the
   * write's notification, and each other instance acknowledges the barrier after handling
   * it likewise. The other instances are the listening sessions of this schema that
   * `pg_stat_activity` lists *before* the barrier is sent (each was LISTENing then, so it
   * will receive it; one that comes online later empties its cache when it does).
   *
   * Bounded by `barrierTimeoutMs`; never throws (the write has committed). Past the bound:
   * this instance's listener is reset (its cache off until it LISTENs again and is
   * emptied), and the listening sessions of the other instances that neither acknowledged
   * nor ended are terminated, which turns their caches off the same way. With this
   * instance's listener offline its own cache is off, but the other instances' are still
   * waited for (their acknowledgements cannot be received here, so their sessions are
   * ended once the bound passes). An instance that cannot hear its session ended (cut off
   * without a reset) is covered by the bound itself: a write that did not hear from it
   * returns no sooner than the bound after its commit, and by then that instance, whose
   * session has answered nothing sent since, no longer trusts its cache ({@link enabled}).
   */
  async barrier(): Promise<void> {
    const started = performance.now();
    try {
      if (!(await this.notifier.whenOnline(this.timeoutMs))) {
        // No way to hear acknowledgements: end every other listener (fail closed). The
        // bound has passed since the commit: a listener cut off unheard trusts its cache no more.
        await elapsed(started, this.timeoutMs);
        const peers = await this.options.peers(-1);
        if (peers.length > 0) {
          this.options.logger?.warn(
            { sessions: peers.length },
            "state barrier: not listening; ending the other instances' listening sessions",
          );
          await this.options.terminate(peers);
        }
        return;
      }
      const own = this.notifier.backendPid;
      if (own === null || !this.notifier.online) return this.barrier();
      const peers = await this.options.peers(own);
      const token = `${own}:${++this.seq}`;
      let done!: () => void;
      const settled = new Promise<void>((resolve) => {
        done = resolve;
      });
      this.waiting.set(token, { own: true, peers: new Set(peers), done });
      try {
        await this.options.notify(this.options.channel, `${BARRIER}${token}`);
        // From the notification's commit on: a listener that missed it has answered no query
        // sent since, so it stops trusting its cache within the bound (see enabled).
        const timer = elapsed(performance.now(), this.timeoutMs);
        if ((await Promise.race([settled, timer])) !== "timeout") return;
        const entry = this.waiting.get(token);
        if (!entry) return;
        if (entry.own) {
          this.options.logger?.warn(
            {},
            "state barrier: own notification late; cache off until listening again",
          );
          this.notifier.reset("state barrier: own notification did not come back in time");
        }
        if (entry.peers.size > 0) {
          const stuck = await this.options.alive([...entry.peers]);
          if (stuck.length > 0) {
            this.options.logger?.warn(
              { sessions: stuck.length },
              "state barrier: instances did not acknowledge; ending their listening sessions",
            );
            await this.options.terminate(stuck);
            // pg_terminate_backend only signals: wait (bounded) until the sessions are gone,
            // so that their instances have been sent the end of their session before this write returns.
            for (let i = 0; i < 50 && (await this.options.alive(stuck)).length > 0; i++) await sleep(10);
          }
        }
      } finally {
        this.waiting.delete(token);
      }
    } catch {
      // The database is unreachable (the write itself committed): nobody reads the change
      // from it now, and a listener that lost it stops trusting its cache within the bound
      // (its session answers nothing more), so the write returns once the bound has passed.
      this.notifier.reset("state barrier failed");
      await elapsed(started, this.timeoutMs);
    }
  }
}
