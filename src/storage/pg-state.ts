import { createHash } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import type { Storage } from "./orm.js";
import { PgNotifier, type PgNotifyLogger } from "./pg-notify.js";
import { INSERT_EXEMPT, RowBuckets, STATE_TABLES, type StateCacheStats } from "./row-cache.js";

/**
 * The channel on which the triggers of Migration20261204230000_state_notify announce a
 * change to a state table of `schema` (payload: the table name). One per schema, since
 * LISTEN/NOTIFY is per database and schemas share one; md5 keeps it a short identifier.
 */
export function stateChannel(schema: string): string {
  return `tessera_state_${createHash("md5").update(schema).digest("hex")}`;
}

/**
 * This instance's listening session for a PostgreSQL storage, not started: its
 * `application_name` names the schema's state channel, so the write barriers of the other
 * instances find it in `pg_stat_activity`. Subscribe (createSqlRunner does, and any other
 * user of the session should) before calling its `start()`.
 */
export async function createStateNotifier(storage: Storage, logger?: PgNotifyLogger): Promise<PgNotifier> {
  return new PgNotifier({
    url: storage.target.location,
    applicationName: `tessera:${await stateChannelOf(storage)}`,
    ...(logger ? { logger } : {}),
  });
}

/** The state channel of the schema `storage` works in ({@link stateChannel}). */
export async function stateChannelOf(storage: Storage): Promise<string> {
  const rows = (await storage.em.getConnection().execute("select current_schema() as s")) as { s: string }[];
  return stateChannel(rows[0]?.s ?? "public");
}

/** The payload the triggers send for a change to the signing keys. */
export const SIGNING_KEYS_PAYLOAD = "signing_keys";

/**
 * Have `onChange` called when the signing keys change (the `signing_keys` trigger's
 * notification on `channel`), and when the listener comes back online (a change may have
 * been missed meanwhile). Subscribe before the notifier starts.
 */
export function subscribeKeyChanges(notifier: PgNotifier, channel: string, onChange: () => void): void {
  notifier.subscribe(channel, (payload) => {
    if (payload === SIGNING_KEYS_PAYLOAD) onChange();
  });
  notifier.onStatus((online) => {
    if (online) onChange();
  });
}

/** Tables the triggers announce: the state tables and the signing keys. */
const ANNOUNCED: ReadonlySet<string> = new Set<string>([...STATE_TABLES, "signing_keys"]);

/** The trigger Migration20261204230000_state_notify puts on every announced table. */
export const NOTIFY_TRIGGER = "tessera_state_notify";

/**
 * SQL listing, of the tables named in its one parameter (comma-separated: knex would expand
 * an array parameter into a list) in the current schema, those whose changes are surely
 * announced: the row trigger (after insert, update and delete; sessions: update and
 * delete) and the statement trigger after truncate, both calling the notify function and
 * enabled ALWAYS (an ordinary trigger does not fire for a writer in `replica` session
 * replication role; a disabled one not at all). A table rebuilt, a trigger dropped, disabled
 * or repointed by hand would leave changes unannounced and caches stale.
 * tgtype bits: 1 row, 2 before, 4 insert, 8 delete, 16 update, 32 truncate.
 */
export const TRIGGERED_TABLES_SQL =
  "select c.relname as t from pg_class c join pg_namespace n on n.oid = c.relnamespace " +
  "where n.nspname = current_schema() and c.relname = any(string_to_array(?, ',')) " +
  "and exists (select 1 from pg_trigger tg where tg.tgrelid = c.oid " +
  `and tg.tgname = '${NOTIFY_TRIGGER}' and tg.tgenabled = 'A' and tg.tgfoid = to_regproc('${NOTIFY_TRIGGER}')::oid ` +
  "and (tg.tgtype & 31) = (case when c.relname = 'sessions' then 25 else 29 end)) " +
  "and exists (select 1 from pg_trigger tg where tg.tgrelid = c.oid " +
  `and tg.tgname = '${NOTIFY_TRIGGER}_truncate' and tg.tgenabled = 'A' and tg.tgfoid = to_regproc('${NOTIFY_TRIGGER}')::oid ` +
  "and (tg.tgtype & 35) = 32)";

/** How often a running instance checks that the notify triggers are still in place. */
export const TRIGGER_CHECK_MS = 5_000;

/** Every table whose changes must be announced, for {@link TRIGGERED_TABLES_SQL}. */
export const ANNOUNCED_TABLES: readonly string[] = [...ANNOUNCED];
const WATCHED: ReadonlySet<string> = new Set<string>(STATE_TABLES);

/** Payload prefixes of the write barrier (table names never start with "~"). */
const BARRIER = "~b:";
const ACK = "~a:";

/** Statements that write nothing the triggers announce. */
const NO_WRITE =
  /^\s*(?:select|show|set|begin|start\s+transaction|commit|rollback|savepoint|release|listen|unlisten|notify|explain|create\s+schema)\b/i;
const WRITE_TARGET = /^\s*(insert\s+into|update|delete\s+from)\s+(?:"?\w+"?\.)?"?(\w+)"?/i;
/** The coalesced last-used flush (auth/last-used.ts): the triggers ignore it, so the barrier does too. */
const LAST_USED_ONLY =
  /^\s*update\s+(?:"?\w+"?\.)?"?\w+"?\s+set\s+"?last_used_at"?\s*=\s*('[^']*'|\?|\$\d+|[\w:.+-]+)\s+where\b/i;
/**
 * A shared verified-secret digest stored (auth/secret-cache.ts): the triggers ignore it
 * (Migration20261205010000_verified_digests says why that is safe), so the barrier does too.
 */
const VERIFIED_DIGEST_ONLY =
  /^\s*update\s+(?:"?\w+"?\.)?"?\w+"?\s+set\s+"?verified_digest"?\s*=\s*(\?|\$\d+)\s+where\b/i;

/**
 * Whether a statement may change what the state triggers announce. Anything not
 * recognised as harmless counts as a change (a needless barrier costs a round trip; a
 * missing one would let this instance return before its cache is emptied).
 */
export function writesAnnouncedState(sql: string): boolean {
  if (NO_WRITE.test(sql)) return false;
  const m = WRITE_TARGET.exec(sql);
  if (!m) return true;
  const table = m[2]!.toLowerCase();
  if (!ANNOUNCED.has(table)) return false;
  if (/^insert/i.test(m[1]!) && INSERT_EXEMPT.has(table)) return false;
  return !LAST_USED_ONLY.test(sql) && !VERIFIED_DIGEST_ONLY.test(sql);
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

  /** Whether answers may come from memory now. */
  get enabled(): boolean {
    return this.options.perStatement > 0 && this.notifier.online && this.triggersOk;
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

  async read<T>(sql: string, params: readonly unknown[], load: () => Promise<T>): Promise<T> {
    if (!this.enabled) {
      this.rows.counters.misses++;
      return load();
    }
    const hit = this.rows.get<T>(sql, params);
    if (hit !== undefined) return hit;
    this.rows.counters.misses++;
    const epoch = this.epoch;
    const value = await load();
    // Kept only if nothing emptied the cache while the row was read (it may predate that change).
    if (epoch === this.epoch && this.enabled) this.rows.set(sql, params, value);
    return value;
  }

  /** A kept answer, synchronously (counted as a hit), or undefined: not kept, or the cache is off. */
  peek<T>(sql: string, params: readonly unknown[]): T | undefined {
    return this.enabled ? this.rows.get<T>(sql, params) : undefined;
  }

  stats(): StateCacheStats {
    return { enabled: this.enabled, ...this.rows.counters, triggersMissing: this.missing.length };
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
   * ended once the bound passes).
   */
  async barrier(): Promise<void> {
    try {
      if (!(await this.notifier.whenOnline(this.timeoutMs))) {
        // No way to hear acknowledgements: end every other listener (fail closed).
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
        const timer = sleep(this.timeoutMs, "timeout" as const, { ref: false });
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
      // from it now, and every listener that lost it is offline, its cache off.
      this.notifier.reset("state barrier failed");
    }
  }
}

/** The few members of MikroORM's SQL connection the write hook wraps. */
interface HookableConnection {
  execute(
    query: unknown,
    params?: unknown,
    method?: unknown,
    ctx?: unknown,
    ...rest: unknown[]
  ): Promise<unknown>;
  begin(options?: { ctx?: unknown }): Promise<unknown>;
  commit(ctx: unknown, ...rest: unknown[]): Promise<void>;
}

function sqlText(query: unknown): string {
  if (typeof query === "string") return query;
  const compiled = (query as { toSQL?: () => { sql?: string } }).toSQL?.();
  return compiled?.sql ?? "";
}

/**
 * Make every write to announced state through `conn` (MikroORM's connection, which the
 * ORM's flushes, native queries, query builders and `SqlRunner.run` all execute through)
 * wait for `afterCommit` once it has committed: right after the statement outside a
 * transaction, after the commit of the outermost transaction inside one (a savepoint's
 * writes count for the transaction around it). Instance-level wrappers, not a subclass:
 * the driver creates its connection itself.
 */
export function installWriteHook(conn: HookableConnection, afterCommit: () => Promise<void>): void {
  const parents = new WeakMap<object, object>();
  const dirty = new WeakSet<object>();
  /** A write whose transaction could not be told (a knex builder bound to one): barrier at the next commit. */
  let untracked = false;
  // A knex transaction is a function object.
  const isTrx = (ctx: unknown): ctx is object =>
    ctx !== null && (typeof ctx === "object" || typeof ctx === "function");
  const root = (trx: object) => {
    let t = trx;
    for (let p = parents.get(t); p !== undefined; p = parents.get(t)) t = p;
    return t;
  };
  const execute = conn.execute.bind(conn);
  const begin = conn.begin.bind(conn);
  const commit = conn.commit.bind(conn);
  conn.execute = async (query, params, method, ctx, ...rest) => {
    const writes = writesAnnouncedState(sqlText(query));
    const result = await execute(query, params, method, ctx, ...rest);
    if (writes) {
      if (isTrx(ctx)) dirty.add(root(ctx));
      else if (
        typeof query !== "string" &&
        (query as { client?: { transacting?: boolean } }).client?.transacting
      )
        untracked = true;
      else await afterCommit();
    }
    return result;
  };
  conn.begin = async (options) => {
    const trx = await begin(options);
    if (isTrx(options?.ctx) && isTrx(trx)) parents.set(trx, options.ctx);
    return trx;
  };
  conn.commit = async (ctx, ...rest) => {
    await commit(ctx, ...rest);
    if (!isTrx(ctx) || parents.has(ctx)) return;
    if (dirty.has(ctx) || untracked) {
      dirty.delete(ctx);
      untracked = false;
      await afterCommit();
    }
  };
}
