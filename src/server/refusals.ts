import type { Server } from "node:net";
import type { Clock } from "../clock.js";

// What the connection limits refused: counted process-wide (the metrics read the counts when
// scraped) and reported in one aggregated warning per interval, never a line per refusal.

/**
 * Why a connection was closed before TLS (the per-address bound, the per-address rate, the
 * total), or why an HTTP/2 stream was refused (`open_streams_per_ip`: the address's open
 * streams, `server.maxOpenStreamsPerIp`).
 */
export type ConnectionRefusal = "per_ip" | "rate" | "total" | "open_streams_per_ip";

/** Refusals since the start, by bound (process-wide; metrics read it when scraped). */
export const connectionRefusals: Record<ConnectionRefusal, number> = {
  per_ip: 0,
  rate: 0,
  total: 0,
  open_streams_per_ip: 0,
};

/** Where refusals are reported: one aggregated warning per {@link REFUSAL_LOG_INTERVAL_MS} that had any. */
export interface RefusalLogger {
  warn(obj: object, msg: string): void;
}

export const REFUSAL_LOG_INTERVAL_MS = 10_000;

/**
 * Count a refusal, and log this server's counts once per interval that had any: a line per
 * refused connection or stream would make a flood of them a flood of log lines. An interval
 * starts at its first refusal; its line is written at its end (a timer), or by the first
 * refusal `clock` puts past its end, or when the server closes, whichever comes first, so
 * the last interval's refusals are logged too.
 */
export function refusalCounter(
  server: Server,
  log: { logger: RefusalLogger; clock: Clock } | undefined,
  intervalMs = REFUSAL_LOG_INTERVAL_MS,
): (why: ConnectionRefusal) => void {
  // This server's refusals in the interval open now (undefined: none is).
  let pending: Record<ConnectionRefusal, number> | undefined;
  let endsAt = 0;
  let timer: NodeJS.Timeout | undefined;
  const flush = () => {
    clearTimeout(timer);
    timer = undefined;
    if (pending === undefined || log === undefined) return;
    const refused: Partial<Record<ConnectionRefusal, number>> = {};
    for (const k of Object.keys(pending) as ConnectionRefusal[]) if (pending[k] > 0) refused[k] = pending[k];
    pending = undefined;
    log.logger.warn(
      { refused, intervalMs },
      "connections closed before TLS, or HTTP/2 streams refused, by the connection limits (counted in tessera_connections_refused_total and tessera_streams_refused_total)",
    );
  };
  if (log !== undefined) server.once("close", flush);
  return (why) => {
    connectionRefusals[why]++;
    if (log === undefined) return;
    if (pending !== undefined && log.clock() >= endsAt) flush();
    if (pending === undefined) {
      pending = { per_ip: 0, rate: 0, total: 0, open_streams_per_ip: 0 };
      endsAt = log.clock() + intervalMs;
      timer = setTimeout(flush, intervalMs).unref();
    }
    pending[why]++;
  };
}
