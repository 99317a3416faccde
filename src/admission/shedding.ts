import type { DescMethod } from "@bufbuild/protobuf";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { WireError } from "../transport/early-answers.js";
import { refusalOnTheWire } from "../transport/error-wire.js";
import { authRuleFor } from "./auth-rule.js";

/**
 * Load shedding of password checks: while the PBKDF2 pool has no room for one more check
 * (`hasRoom`, the very test the check itself would fail), a call whose rule says `password`
 * (Login, ChangePassword) is answered Unavailable + Retry-After by the HTTP layer before
 * its body is read: no parsing, no per-IP limiter round trip, no audit record and no access
 * line of its own. It is the answer it would get anyway, after all of that.
 *
 * Why not audited or access-logged per call: during a flood these refusals are nearly every
 * request, and a write (an audit row, a log line) per refused request is the flood's
 * amplifier, measured at a third of a refused Login's event-loop time
 * (bench/results/2026-12-05-quiet-ab.md §3). Every shed call is still counted (the
 * `tessera_password_checks_shed_total` counter, and `tessera_rpc_requests_total` as
 * unavailable) and logged in aggregate: one warning per interval with the count per
 * method, only in intervals that shed any.
 *
 * An address this instance already knows to be over its per-IP request limit or its
 * failed-authentication budget (`spentAddress`: a synchronous look at the limiters' own
 * state, no store round trip) is answered the 429 RATE_LIMITED it gets once the pool has
 * room, with that budget's Retry-After, rather than 503 with `Retry-After: 1`: a guesser
 * who has spent its budget is not invited back every second, nor told how busy the pool
 * is. A shed call itself is not counted against the per-IP limit: counting needs the
 * limiter's store (Redis, when shared), the round trip the shedding exists to avoid, and
 * the calls it would count are the cheapest the server answers.
 */
export interface PasswordShedding {
  /**
   * The early answer of a call to `method` when it must be shed now, else undefined. Marks
   * `state` so that the call is not access-logged line by line ({@link RequestState.aggregated}).
   */
  shed(method: DescMethod, state: RequestState): WireError | undefined;
  /** Calls shed since the start, by method; read when scraped. */
  counts(): ReadonlyMap<DescMethod, number>;
  /** Write the pending aggregated line now (at shutdown), and stop its timer. */
  flush(): void;
}

/** Options of {@link createPasswordShedding}. */
export interface PasswordSheddingOptions {
  /** Whether a password check asked for now would find room in the hash pool (`hashPool().hasRoom()`). */
  hasRoom: () => boolean;
  /** Where the aggregated line goes. */
  logger: { warn(obj: object, msg: string): void };
  /** Milliseconds an aggregated line covers (default {@link SHED_LOG_INTERVAL_MS}). */
  intervalMs?: number;
  /**
   * The RATE_LIMITED refusal a call from this client address gets anyway, when this
   * instance knows synchronously that the address has spent a per-IP budget (rate-limit.ts's
   * `spentAddressRefusal`); undefined when rate limits are off.
   */
  spentAddress?: (ip: string) => TesseraError | undefined;
}

/** Default interval of the aggregated log line of shed calls. */
export const SHED_LOG_INTERVAL_MS = 10_000;

/**
 * The refusal, made once: the pool's own BUSY refusal (same reason and message), without
 * headers so that its wire form is made once and kept (transport/error-wire.ts keeps the
 * shapes of errors without headers); Retry-After goes with each answer instead.
 */
const SHED = new TesseraError("UNAVAILABLE", "the server is busy verifying passwords; try again shortly");
const RETRY_AFTER: Readonly<Record<string, string>> = Object.freeze({ "retry-after": "1" });

/** Whether calls to `method` check a password (its rule's `password`); a method without a rule is left to admission. */
function checksPassword(method: DescMethod): boolean {
  try {
    return authRuleFor(method).password;
  } catch {
    return false;
  }
}

/** Create the shedding of password checks (one per app: its counts are the app's metrics). */
export function createPasswordShedding(options: PasswordSheddingOptions): PasswordShedding {
  const { hasRoom, logger, spentAddress } = options;
  const intervalMs = options.intervalMs ?? SHED_LOG_INTERVAL_MS;
  const totals = new Map<DescMethod, number>();
  /** Shed since the last aggregated line, by method. */
  let pending = new Map<DescMethod, number>();
  /** Answered RATE_LIMITED instead (a spent address) since the last aggregated line. */
  let pendingLimited = 0;
  let timer: NodeJS.Timeout | undefined;
  let since = 0;

  const flush = () => {
    timer = undefined;
    if (pending.size === 0 && pendingLimited === 0) return;
    const byMethod: Record<string, number> = {};
    let total = 0;
    for (const [method, n] of pending) {
      byMethod[`${method.parent.typeName}/${method.name}`] = n;
      total += n;
    }
    const rateLimited = pendingLimited;
    pending = new Map();
    pendingLimited = 0;
    logger.warn(
      {
        shed: total,
        byMethod,
        ...(rateLimited > 0 ? { rateLimited } : {}),
        seconds: Math.round((performance.now() - since) / 100) / 10,
      },
      "password checks refused before their body: the hash pool is full",
    );
  };

  return {
    shed(method, state) {
      if (!checksPassword(method) || hasRoom()) return undefined;
      if (pending.size === 0 && pendingLimited === 0) since = performance.now();
      // One timer per interval, and only while shedding: nothing runs when nothing is shed.
      if (timer === undefined) timer = setTimeout(flush, intervalMs).unref();
      state.aggregated = true;
      const limited = spentAddress?.(state.ip);
      if (limited !== undefined) {
        pendingLimited++;
        state.errorInfo = { reason: limited.reason, requestId: state.requestId };
        return refusalOnTheWire(limited, state.requestId, undefined);
      }
      totals.set(method, (totals.get(method) ?? 0) + 1);
      pending.set(method, (pending.get(method) ?? 0) + 1);
      // As the error interceptor keeps it, for the metrics (call-observer.ts).
      state.errorInfo = { reason: SHED.reason, requestId: state.requestId };
      return refusalOnTheWire(SHED, state.requestId, RETRY_AFTER);
    },
    counts: () => totals,
    flush() {
      if (timer !== undefined) clearTimeout(timer);
      flush();
    },
  };
}
