import { createRequire } from "node:module";

/** The few calls of `pg` (MikroORM's PostgreSQL driver, already installed) used here. */
interface PgNotification {
  channel: string;
  payload?: string;
  processId: number;
}
interface PgClient {
  connect(): Promise<void>;
  query(sql: string): Promise<unknown>;
  end(): Promise<void>;
  on(event: "notification", fn: (msg: PgNotification) => void): PgClient;
  on(event: "error", fn: (err: Error) => void): PgClient;
  on(event: "end", fn: () => void): PgClient;
  removeAllListeners(): PgClient;
  readonly processID: number | null;
  readonly connection?: { stream?: { destroy(): void } };
}
type PgClientClass = new (options: {
  connectionString: string;
  application_name?: string;
  keepAlive?: boolean;
  keepAliveInitialDelayMillis?: number;
  connectionTimeoutMillis?: number;
}) => PgClient;

/** Where {@link PgNotifier} reports its state changes (once per change, never per retry). */
export interface PgNotifyLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

/** Options of {@link PgNotifier}. */
export interface PgNotifierOptions {
  /** PostgreSQL connection URL (the database's, without Tessera's `schema` parameter). */
  url: string;
  /**
   * `application_name` of the listening session, set once it LISTENs on every channel: how
   * other instances (and operators, and tests) find it in `pg_stat_activity`.
   */
  applicationName?: string;
  logger?: PgNotifyLogger;
  /** How often an idle listener proves its session is alive (default 1,000 ms). */
  keepaliveMs?: number;
  /** How long a connect or a keepalive may take before the session is taken for dead (default 2,000 ms). */
  timeoutMs?: number;
  /** First and last delay between reconnection attempts (default 50 ms, doubling up to 2,000 ms). */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
}

/** Receives a channel's notifications: the payload and the backend pid of the session that sent it. */
export type NotificationHandler = (payload: string, senderPid: number) => void;

/** Double-quote a channel name as a PostgreSQL identifier (LISTEN takes no bind parameter). */
function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/**
 * One dedicated PostgreSQL session per process that LISTENs on the channels subscribed
 * to, with an online/offline signal: online only while the session is connected and
 * LISTENing on every channel, offline from the moment it errors, ends, or fails a
 * keepalive, until a new session LISTENs again. What a subscriber learns from the
 * signal: while online, every notification of its channels committed since the last
 * `online` event reaches it in commit order (PostgreSQL's notification queue is one
 * queue, in commit order); across an offline period notifications may have been missed,
 * so a subscriber that caches must distrust its cache while offline and drop it when the
 * signal comes back. A session cut off without a reset stays "online" until its keepalive
 * times out: {@link PgNotifier.provenWithin} says whether it answered recently enough.
 *
 * Why hand-written: `pg` gives the session and its `notification` event but no reconnect;
 * `pg-listen` (the usual wrapper) re-LISTENs but gives no signal a cache can rely on at the
 * moment the session is lost, and nothing here needs more than this.
 *
 * Dead sessions are found by the `error`/`end` events (`pg_terminate_backend` sends a FATAL
 * first, so the event comes at once), and where the network just goes silent by a
 * keepalive: an empty query every `keepaliveMs` that must be answered within `timeoutMs`
 * (an empty query is one round trip through the backend that begins no transaction, so it
 * does not show in `pg_stat_database`), plus TCP keepalive on the socket.
 */
export class PgNotifier {
  private readonly Client: PgClientClass;
  private readonly handlers = new Map<string, Set<NotificationHandler>>();
  private readonly statusHandlers = new Set<(online: boolean) => void>();
  private client: PgClient | null = null;
  private isOnline = false;
  private closed = false;
  private reconnectDelay: number;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private keepaliveTimer: NodeJS.Timeout | null = null;
  private probing = false;
  private everOnline = false;
  /** When the last query the session answered was sent (`performance.now()`): see {@link provenWithin}. */
  private provenAt = Number.NEGATIVE_INFINITY;
  private readonly keepaliveMs: number;
  private readonly timeoutMs: number;
  private readonly minDelay: number;
  private readonly maxDelay: number;

  constructor(private readonly options: PgNotifierOptions) {
    this.Client = (createRequire(import.meta.url)("pg") as { Client: PgClientClass }).Client;
    this.keepaliveMs = options.keepaliveMs ?? 1_000;
    this.timeoutMs = options.timeoutMs ?? 2_000;
    this.minDelay = options.reconnectMinMs ?? 50;
    this.maxDelay = options.reconnectMaxMs ?? 2_000;
    this.reconnectDelay = this.minDelay;
  }

  /** The `application_name` the session takes once it LISTENs (see {@link PgNotifierOptions}). */
  get applicationName(): string | undefined {
    return this.options.applicationName;
  }

  /** Whether the session is connected and LISTENing on every subscribed channel. */
  get online(): boolean {
    return this.isOnline;
  }

  /**
   * Whether online and the session answered a query sent less than `ms` ago (the
   * keepalive's, or the LISTENs of its start). Past that, the session may have been ended
   * by the database while this process heard nothing of it (packets dropped, no reset: a
   * partition), and notifications sent since may never arrive. PostgreSQL sends a listening
   * session its pending notifications before it answers a query, so an answer to a query
   * sent at `t` means every notification committed before `t` has been delivered.
   */
  provenWithin(ms: number): boolean {
    return this.isOnline && performance.now() - this.provenAt < ms;
  }

  /**
   * How long ago the last query the session answered was sent (ms; infinite before any):
   * every notification committed before then has been delivered. Still the last proof's
   * age once offline, so a subscriber knows up to when it heard everything.
   */
  get provenAgoMs(): number {
    return performance.now() - this.provenAt;
  }

  /**
   * The backend pid of the current session (as `pg_stat_activity.pid` shows it), once
   * connected (it may still be setting up: see {@link online}), else null.
   */
  get backendPid(): number | null {
    return this.client?.processID ?? null;
  }

  /**
   * Receive the notifications of `channel`. A channel new to a session that is online is
   * LISTENed at once; notifications sent before that LISTEN completes are not delivered
   * (subscribe before {@link start} to have every one from the first `online` on).
   * Returns a function that unsubscribes.
   */
  subscribe(channel: string, fn: NotificationHandler): () => void {
    let set = this.handlers.get(channel);
    if (!set) {
      set = new Set();
      this.handlers.set(channel, set);
      if (this.isOnline && this.client) {
        const client = this.client;
        client.query(`listen ${quoteIdent(channel)}`).catch((err: unknown) => this.lost(client, err));
      }
    }
    set.add(fn);
    return () => {
      set.delete(fn);
    };
  }

  /** Be told of every change between online and offline (called synchronously, in order). */
  onStatus(fn: (online: boolean) => void): () => void {
    this.statusHandlers.add(fn);
    return () => {
      this.statusHandlers.delete(fn);
    };
  }

  /** Resolves true once online (at once if it is), false if `timeoutMs` passes first. */
  whenOnline(timeoutMs: number): Promise<boolean> {
    if (this.isOnline) return Promise.resolve(true);
    return new Promise((resolve) => {
      const off = this.onStatus((online) => {
        if (!online) return;
        clearTimeout(timer);
        off();
        resolve(true);
      });
      const timer = setTimeout(() => {
        off();
        resolve(this.isOnline);
      }, timeoutMs);
      timer.unref();
    });
  }

  /**
   * Connect; resolves once the session is online or the first attempt failed (it then keeps
   * trying in the background). Never rejects: an unreachable database is a state, not a crash.
   */
  async start(): Promise<void> {
    this.keepaliveTimer = setInterval(() => this.probe(), this.keepaliveMs);
    this.keepaliveTimer.unref();
    await this.connect();
  }

  /**
   * Drop the session and connect a new one (offline until it LISTENs again): for a user
   * that can no longer vouch for what it received, e.g. a notification it waited for did
   * not come back in time.
   */
  reset(reason: string): void {
    if (this.client) this.lost(this.client, new Error(reason));
  }

  /** Whether {@link close} was called: it never listens again. */
  get isClosed(): boolean {
    return this.closed;
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    const client = this.client;
    this.client = null;
    this.setOnline(false);
    if (client) {
      client.removeAllListeners();
      client.on("error", () => undefined);
      await client.end().catch(() => undefined);
    }
  }

  private async connect(): Promise<void> {
    if (this.closed) return;
    const client = new this.Client({
      connectionString: this.options.url,
      keepAlive: true,
      keepAliveInitialDelayMillis: this.keepaliveMs,
      connectionTimeoutMillis: this.timeoutMs,
    });
    this.client = client;
    client.on("error", (err) => this.lost(client, err));
    client.on("end", () => this.lost(client, new Error("the listening session ended")));
    client.on("notification", (msg) => {
      // Delivered from the first LISTEN on, before `online` too: a subscriber must not miss
      // what arrives between that LISTEN and the online event (an acknowledgement owed).
      if (this.client !== client) return;
      const handlers = this.handlers.get(msg.channel);
      if (handlers) for (const fn of handlers) fn(msg.payload ?? "", msg.processId);
    });
    let sentAt = 0;
    try {
      await client.connect();
      sentAt = performance.now();
      for (const channel of this.handlers.keys()) await client.query(`listen ${quoteIdent(channel)}`);
      // Named only once it LISTENs: whoever finds it in pg_stat_activity by this name
      // (another instance's write barrier) may count on it receiving what is sent from then on.
      if (this.options.applicationName)
        await client.query(`set application_name = '${this.options.applicationName.replaceAll("'", "''")}'`);
    } catch (err) {
      this.lost(client, err);
      return;
    }
    if (this.client !== client) return;
    this.reconnectDelay = this.minDelay;
    this.provenAt = sentAt;
    this.setOnline(true);
  }

  /** The session `client` is gone or cannot be trusted: offline now, reconnect later. */
  private lost(client: PgClient, err: unknown): void {
    if (this.client !== client) return;
    this.client = null;
    this.probing = false;
    client.removeAllListeners();
    client.on("error", () => undefined);
    client.connection?.stream?.destroy();
    client.end().catch(() => undefined);
    const wasOnline = this.isOnline;
    this.setOnline(false);
    if (this.closed) return;
    if (wasOnline || !this.everOnline)
      this.options.logger?.warn(
        { err: (err as Error)?.message ?? String(err) },
        "database notifications: listening session lost; reconnecting",
      );
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.connect();
    }, this.reconnectDelay);
    this.reconnectTimer.unref();
    this.reconnectDelay = Math.min(this.reconnectDelay * 2, this.maxDelay);
  }

  private probe(): void {
    const client = this.client;
    if (!client || !this.isOnline || this.probing) return;
    this.probing = true;
    const timer = setTimeout(() => this.lost(client, new Error("keepalive not answered")), this.timeoutMs);
    timer.unref();
    const sentAt = performance.now();
    client.query("").then(
      () => {
        clearTimeout(timer);
        if (this.client !== client) return;
        this.probing = false;
        this.provenAt = Math.max(this.provenAt, sentAt);
      },
      (err: unknown) => {
        clearTimeout(timer);
        this.lost(client, err);
      },
    );
  }

  private setOnline(online: boolean): void {
    if (this.isOnline === online) return;
    this.isOnline = online;
    if (online) {
      if (this.everOnline) this.options.logger?.info({}, "database notifications: listening again");
      this.everOnline = true;
    }
    for (const fn of this.statusHandlers) fn(online);
  }
}
