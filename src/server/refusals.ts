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
 * Count a refusal; the first of an interval schedules one warning with the interval's counts:
 * a line per refused connection or stream would make a flood of them a flood of log lines.
 */
export function refusalCounter(
  logger: RefusalLogger | undefined,
  intervalMs = REFUSAL_LOG_INTERVAL_MS,
): (why: ConnectionRefusal) => void {
  let since: Record<ConnectionRefusal, number> | undefined;
  return (why) => {
    connectionRefusals[why]++;
    if (logger === undefined) return;
    if (since === undefined) {
      since = { ...connectionRefusals };
      setTimeout(() => {
        const refused: Partial<Record<ConnectionRefusal, number>> = {};
        for (const k of Object.keys(connectionRefusals) as ConnectionRefusal[]) {
          const n = connectionRefusals[k] - since![k];
          if (n > 0) refused[k] = n;
        }
        since = undefined;
        logger.warn(
          { refused, intervalMs },
          "connections closed before TLS, or HTTP/2 streams refused, by the connection limits (counted in tessera_connections_refused_total and tessera_streams_refused_total)",
        );
      }, intervalMs).unref();
      // The refusal that started the interval is in it.
      since[why]--;
    }
  };
}
