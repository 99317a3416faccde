import type { Server } from "node:net";
import type { Clock } from "../clock.js";
import { AggregatedLog } from "../sdk/logger.js";

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
 * refused connection or stream would make a flood of them a flood of log lines. The interval
 * is an {@link AggregatedLog}'s, read from `clock`, and the last one is written when the
 * server closes, so its refusals are logged too.
 */
export function refusalCounter(
  server: Server,
  log: { logger: RefusalLogger; clock: Clock } | undefined,
  intervalMs = REFUSAL_LOG_INTERVAL_MS,
): (why: ConnectionRefusal) => void {
  if (log === undefined)
    return (why) => {
      connectionRefusals[why]++;
    };
  const refusals = new AggregatedLog<ConnectionRefusal>(
    ({ counts }) =>
      log.logger.warn(
        { refused: counts, intervalMs },
        "connections closed before TLS, or HTTP/2 streams refused, by the connection limits (counted in tessera_connections_refused_total and tessera_streams_refused_total)",
      ),
    log.clock,
    intervalMs,
  );
  server.once("close", () => refusals.flush());
  return (why) => {
    connectionRefusals[why]++;
    refusals.add(undefined, why);
  };
}
