// Where the SDK reports what it would otherwise drop silently (a revocation stream lost, a
// cache emptied, verifications refused or failing): through a logger the application gives.
import { debuglog } from "node:util";

/**
 * The logger the SDK reports to: the `(obj, msg)` methods of pino, so a pino logger (or a
 * child of one) fits as is, and so do bunyan and most structured loggers. `info` is optional:
 * recoveries are reported there when it exists. `obj` never holds a credential, nor a
 * prefix or a hash of one.
 */
export interface TesseraLogger {
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
  info?(obj: object, msg: string): void;
}

const debug = debuglog("tessera");

/**
 * The logger of an SDK given none: silent, unless `NODE_DEBUG=tessera` is set, then lines on
 * stderr (Node's `util.debuglog`, as Node's own modules do). A library does not write to an
 * application's console on its own: the application owns its output (a CLI's, a JSON log
 * pipeline's) and decides where warnings go, so it passes its logger (`logger: pino()`).
 */
export const defaultLogger: TesseraLogger = {
  warn: (obj, msg) => debug("WARN %s %j", msg, obj),
  error: (obj, msg) => debug("ERROR %s %j", msg, obj),
  info: (obj, msg) => debug("INFO %s %j", msg, obj),
};

/**
 * What an error is reported as: its class and code, and its message only when `withMessage`
 * (an error of the network or of Tessera's answer). Never the error object, whose message or
 * cause may quote what was parsed: a JSON.parse error quotes its input, a credential's part.
 */
export function errorFields(
  err: unknown,
  withMessage: boolean,
): { name: string; code?: string | number; message?: string } {
  if (!(err instanceof Error)) return { name: typeof err };
  const code = (err as { code?: unknown }).code;
  return {
    name: err.name,
    ...(typeof code === "string" || typeof code === "number" ? { code } : {}),
    ...(withMessage ? { message: err.message } : {}),
  };
}

/** Interval of an {@link AggregatedLog}'s lines (default). */
export const AGGREGATE_INTERVAL_MS = 10_000;

/**
 * What an {@link AggregatedLog} writes for an interval: its events, the interval, the last
 * error given, and, when events were added with a key, the count of each key that had any.
 */
export type AggregateFields<K extends string = string> = {
  count: number;
  intervalMs: number;
  lastError?: object;
  counts?: Partial<Record<K, number>>;
};

/**
 * An event a caller can cause once per request (a flood of new credentials; every call while
 * Tessera is unreachable; a connection refused by a limit), reported as one line per interval
 * that had any, with its count (by key, when events are told apart), never a line each. An
 * interval starts at its first event; its line is written at its end (an unref'd timer), or
 * by the first event `now` puts past its end, or by {@link flush} (at close), whichever
 * comes first.
 */
export class AggregatedLog<K extends string = string> {
  #count = 0;
  #endsAt = 0;
  #timer: NodeJS.Timeout | undefined;
  #last: object | undefined;
  #counts: Partial<Record<K, number>> | undefined;

  constructor(
    private readonly write: (fields: AggregateFields<K>) => void,
    private readonly now: () => number,
    readonly intervalMs = AGGREGATE_INTERVAL_MS,
  ) {}

  /**
   * One event; `last`, when given (see {@link errorFields}), is reported as the interval's
   * last error; `key`, when given, is counted in the line's `counts` too.
   */
  add(last?: object, key?: K): void {
    if (this.#count > 0 && this.now() >= this.#endsAt) this.flush();
    if (this.#count === 0) {
      this.#endsAt = this.now() + this.intervalMs;
      this.#timer = setTimeout(() => this.flush(), this.intervalMs).unref();
    }
    this.#count++;
    if (last !== undefined) this.#last = last;
    if (key !== undefined) {
      this.#counts ??= {};
      this.#counts[key] = (this.#counts[key] ?? 0) + 1;
    }
  }

  /** Write the open interval's line now, if it had any event. */
  flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#count === 0) return;
    const fields: AggregateFields<K> = {
      count: this.#count,
      intervalMs: this.intervalMs,
      ...(this.#last ? { lastError: this.#last } : {}),
      ...(this.#counts ? { counts: this.#counts } : {}),
    };
    this.#count = 0;
    this.#last = undefined;
    this.#counts = undefined;
    this.write(fields);
  }
}
