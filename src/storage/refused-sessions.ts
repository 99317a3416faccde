// PostgreSQL refusing this instance's new sessions while it runs: answered Unavailable like
// any outage, but one that does not end by itself (a restart, a failover do), so an
// operator must be told, at error level, without a line per refused call.
import type { Logger } from "pino";

/** At most one error line per this many ms (per logger), with the count of refusals since the last. */
export const REFUSED_SESSION_LOG_INTERVAL_MS = 10_000;

/**
 * The SQLSTATE of a new session PostgreSQL refused, in `err` or an error it wraps: class 28
 * (invalid authorization: the role's password rotated ahead of the configuration, its LOGIN
 * taken away, pg_hba.conf) or 3D000 (the database renamed, dropped or being restored).
 */
export function refusedSessionCode(err: unknown): string | undefined {
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && (/^28[0-9A-Z]{3}$/.test(code) || code === "3D000")) return code;
  }
  return undefined;
}

const lastLines = new WeakMap<object, { at: number; since: number }>();

/**
 * Log, at error level and at most once per {@link REFUSED_SESSION_LOG_INTERVAL_MS}, that the
 * database refuses this instance's sessions, naming the SQLSTATE, when `err` says so; the
 * refusals in between are counted into the next line. Anything else: nothing.
 */
export function reportRefusedSession(err: unknown, logger: Pick<Logger, "error">, now = Date.now()): void {
  const sqlstate = refusedSessionCode(err);
  if (sqlstate === undefined) return;
  const last = lastLines.get(logger);
  if (last !== undefined && now - last.at < REFUSED_SESSION_LOG_INTERVAL_MS) {
    last.since++;
    return;
  }
  logger.error(
    { sqlstate, refusedSinceLastLine: last?.since ?? 0, intervalMs: REFUSED_SESSION_LOG_INTERVAL_MS },
    "the database refuses this instance's sessions (SQLSTATE class 28: the role's password, LOGIN or pg_hba.conf; 3D000: no such database): calls are answered Unavailable until it accepts them",
  );
  lastLines.set(logger, { at: now, since: 0 });
}
