/**
 * The time as Tessera reads it: milliseconds since the epoch, like `Date.now`. Passed
 * through dependencies (never patched globally) so that tests can put an expiry or a
 * grace period's end exactly at "now" and step across it.
 */
export type Clock = () => number;

/** setTimeout's longest delay (2^31 − 1 ms, 24.8 days): Node fires a longer timer after 1 ms. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** The machine's clock. */
export const systemClock: Clock = () => Date.now();

/** A clock that stands still until moved: for tests of exact instants. */
export interface ManualClock {
  /** Read it (pass this as the {@link Clock}). */
  now: Clock;
  /** Move it forward (or back, with a negative value) by `ms`. */
  advance(ms: number): void;
  /** Set it to `ms` since the epoch. */
  set(ms: number): void;
}

/** A {@link ManualClock} starting at `start` (default: the machine's time now). */
export function createManualClock(start: number = Date.now()): ManualClock {
  let t = start;
  return {
    now: () => t,
    advance(ms) {
      t += ms;
    },
    set(ms) {
      t = ms;
    },
  };
}
