// The consumer of Tessera's WatchRevocations stream: it says whether the downstream cache
// may be trusted right now, drops what each event invalidates, and remembers recent
// revocations for access tokens verified offline.
import { timestampMs } from "@bufbuild/protobuf/wkt";
import {
  RevocationKind,
  type WatchRevocationsResponse,
} from "../../../gen/tessera/v1/verification_service_pb.js";
import { errorFields, type TesseraLogger } from "../logger.js";
import type { RevocationTarget } from "./verified-cache.js";

/** Opens the stream from `cursor` ("" to start now); ends or throws when it breaks. */
export type OpenWatch = (cursor: string, signal: AbortSignal) => AsyncIterable<WatchRevocationsResponse>;

/** Options of {@link RevocationWatch}. */
export interface RevocationWatchOptions {
  open: OpenWatch;
  now: () => number;
  /** Tolerated clock difference with Tessera (ms): widens every time comparison to the safe side. */
  skewMs: number;
  /** How long revocations are remembered for offline tokens (the longest access-token lifetime). */
  rememberMs: number;
  /** Called with every event, after the watch's own bookkeeping. */
  onEvent: (target: RevocationTarget, id: string) => void;
  /** Called when the cache must be emptied: the stream went down, or answered `reset`. */
  onLost: () => void;
  /** Delay before reconnecting: first, and the cap of its doubling. */
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /**
   * Where its state changes are reported: a warning when the stream goes down (or cannot
   * connect), once until it is back; info when it is up; a warning for each reset.
   */
  logger?: TesseraLogger;
}

const TARGETS: Partial<Record<RevocationKind, RevocationTarget>> = {
  [RevocationKind.CREDENTIAL]: "credential",
  [RevocationKind.SESSION]: "session",
  [RevocationKind.SUBJECT]: "subject",
  [RevocationKind.TENANT]: "tenant",
};

/** Heartbeat period assumed until the stream names its own. */
const DEFAULT_HEARTBEAT_MS = 15_000;

/** Counters of the watch, for tests, metrics and the bench. */
export interface RevocationWatchStats {
  state: "connecting" | "up" | "down" | "closed";
  connects: number;
  events: number;
  resets: number;
  /** Times the stream was found down (error, end, or silence past twice its heartbeat). */
  drops: number;
}

/**
 * Keeps one WatchRevocations stream open (reconnecting with backoff, resuming from the last
 * cursor) and answers {@link healthy}: the stream answered, and was heard from within twice
 * its heartbeat. Every transition away from healthy calls `onLost` (the cache is emptied),
 * and {@link epoch} moves on every event and every loss, so an answer fetched across one is
 * not stored; and when the stream comes up, so an answer asked while it was down is not either.
 */
export class RevocationWatch {
  readonly #o: RevocationWatchOptions;
  #cursor = "";
  /** The cursor of the last message whose events (or reset) were applied: see {@link position}. */
  #heard = "";
  #up = false;
  #lastHeard = 0;
  #heartbeatMs = DEFAULT_HEARTBEAT_MS;
  #coverageSince = Number.POSITIVE_INFINITY;
  #epoch = 0;
  #closed = false;
  #controller: AbortController | undefined;
  #timer: NodeJS.Timeout | undefined;
  #wake: (() => void) | undefined;
  readonly #revoked = new Map<string, number>();
  readonly #stats: RevocationWatchStats = {
    state: "connecting",
    connects: 0,
    events: 0,
    resets: 0,
    drops: 0,
  };
  readonly #waiters = new Set<() => void>();
  /** The state last reported: a line per change, not per reconnection attempt. */
  #reported: "up" | "down" | undefined;
  readonly #unknownKinds = new Set<number>();

  constructor(options: RevocationWatchOptions) {
    this.#o = options;
    void this.#run();
  }

  /**
   * Whether the cache may be used: connected, and heard from within twice the heartbeat
   * (`now`: the injected clock's reading, when the caller has one already).
   */
  healthy(now: number = this.#o.now()): boolean {
    if (!this.#up) return false;
    if (now - this.#lastHeard <= 2 * this.#heartbeatMs) return true;
    // Silent too long: down now, whatever the socket says.
    this.#lose({ reason: "silent", heartbeatMs: this.#heartbeatMs });
    return false;
  }

  /**
   * The cursor of the last message whose events (or reset) this watch applied ("" before
   * any): sent with each VerifyCredential as `min_revocation_position`, so that whichever
   * instance answers has applied every revocation this service has heard of (another
   * instance may not have yet: its notification still on the way).
   */
  get position(): string {
    return this.#heard;
  }

  /** Moves on every event, every loss of the stream, and when it comes up. */
  get epoch(): number {
    return this.#epoch;
  }

  /**
   * Local time from which every revocation is known here: an access token issued (by
   * Tessera's clock, skew allowed for) at or after it can be checked offline against
   * {@link revokedAt}; an older one must be verified by Tessera.
   */
  get coverageSince(): number {
    return this.#coverageSince;
  }

  /** When the latest revocation of `id` (as `target`) occurred, if one is remembered. */
  revokedAt(target: RevocationTarget, id: string): number | undefined {
    return this.#revoked.get(`${target}:${id}`);
  }

  stats(): RevocationWatchStats {
    return { ...this.#stats };
  }

  /** Resolves once the stream is up (or after `timeoutMs`): for start-up and tests. */
  ready(timeoutMs = 5000): Promise<boolean> {
    if (this.healthy()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#waiters.delete(done);
        resolve(this.healthy());
      };
      const timer = setTimeout(done, timeoutMs);
      this.#waiters.add(done);
    });
  }

  close(): void {
    this.#closed = true;
    this.#stats.state = "closed";
    this.#controller?.abort();
    this.#wake?.();
    if (this.#timer) clearInterval(this.#timer);
    this.#lose();
  }

  /** Down (`why`: how, to report it), or closed (no `why`). */
  #lose(why?: object): void {
    this.#epoch++;
    if (this.#up) {
      this.#up = false;
      this.#stats.drops++;
      if (!this.#closed) this.#stats.state = "down";
      this.#controller?.abort();
    }
    if (why !== undefined) this.#report("down", why);
    this.#o.onLost();
  }

  /** Report a change of state (none while closed, none when it is the state reported last). */
  #report(state: "up" | "down", fields: object): void {
    if (this.#closed || this.#reported === state) return;
    const first = this.#reported === undefined;
    this.#reported = state;
    const log = this.#o.logger;
    const { connects, drops } = this.#stats;
    if (state === "up")
      log?.info?.(
        { connects, drops, ...fields },
        first
          ? "revocation watch up"
          : "revocation watch back up: the verified-credential cache is in use again",
      );
    else
      log?.warn(
        { connects, drops, ...fields },
        first && connects === 0
          ? "revocation watch cannot connect: every credential is verified by Tessera until it does"
          : "revocation watch down: cache emptied, every credential is verified by Tessera until it is back",
      );
  }

  #apply(message: WatchRevocationsResponse): void {
    const now = this.#o.now();
    this.#lastHeard = now;
    if (message.heartbeatSeconds > 0) this.#heartbeatMs = message.heartbeatSeconds * 1000;
    if (message.reset) {
      // Events were missed: nothing cached may stay, and tokens issued before now must be
      // verified by Tessera (their revocations may be among the missed ones).
      this.#stats.resets++;
      this.#o.logger?.warn(
        { resets: this.#stats.resets },
        "revocation watch reset by Tessera (events were missed): cache emptied",
      );
      this.#epoch++;
      this.#coverageSince = now + this.#o.skewMs;
      this.#o.onLost();
    }
    if (message.events.length > 0) this.#epoch++;
    for (const event of message.events) {
      const target = TARGETS[event.kind];
      if (target === undefined) {
        // A kind this client does not know: it cannot tell what it invalidates, so everything,
        // and an access token issued before now may be what it revoked: Tessera decides those.
        this.#coverageSince = now + this.#o.skewMs;
        if (!this.#unknownKinds.has(event.kind)) {
          this.#unknownKinds.add(event.kind);
          this.#o.logger?.warn(
            { kind: event.kind },
            "revocation event of a kind this SDK does not know: cache emptied at each (upgrade the SDK)",
          );
        }
        this.#o.onLost();
        continue;
      }
      this.#stats.events++;
      const at = event.occurredAt ? timestampMs(event.occurredAt) : now;
      const key = `${target}:${event.id}`;
      this.#revoked.set(key, Math.max(at, this.#revoked.get(key) ?? 0));
      this.#o.onEvent(target, event.id);
    }
    if (message.cursor) {
      this.#cursor = message.cursor;
      if (message.reset || message.events.length > 0) this.#heard = message.cursor;
    }
  }

  #prune(): void {
    const horizon = this.#o.now() - this.#o.rememberMs - this.#o.skewMs;
    for (const [key, at] of this.#revoked) if (at < horizon) this.#revoked.delete(key);
  }

  async #run(): Promise<void> {
    const min = this.#o.minBackoffMs ?? 100;
    const max = this.#o.maxBackoffMs ?? 5000;
    let backoff = min;
    this.#timer = setInterval(() => {
      this.healthy();
      this.#prune();
    }, 1000);
    this.#timer.unref();
    while (!this.#closed) {
      const controller = new AbortController();
      this.#controller = controller;
      this.#stats.state = "connecting";
      let why: object = { reason: "ended" };
      try {
        const resumed = this.#cursor !== "";
        for await (const message of this.#o.open(this.#cursor, controller.signal)) {
          this.#apply(message);
          if (!this.#up) {
            this.#up = true;
            // An answer asked before the stream was up may predate a revocation it never
            // sends (one from before a fresh start): not to be cached by a call joining it.
            this.#epoch++;
            this.#stats.state = "up";
            this.#stats.connects++;
            this.#report("up", {});
            backoff = min;
            // Starting afresh: revocations before Tessera answered are unknown here. So too
            // when resuming past missed events: Tessera sends a long catch-up over several
            // messages, and until the last arrives a revocation among the rest is unknown.
            if (resumed ? message.events.length > 0 : this.#coverageSince === Number.POSITIVE_INFINITY)
              this.#coverageSince = this.#o.now() + this.#o.skewMs;
            for (const waiter of [...this.#waiters]) waiter();
          }
        }
      } catch (err) {
        // Down: reconnect below.
        why = { reason: "error", error: errorFields(err, true) };
      }
      this.#lose(why);
      if (this.#closed) break;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, backoff * (0.5 + Math.random() / 2));
        this.#wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      backoff = Math.min(max, backoff * 2);
    }
  }
}
