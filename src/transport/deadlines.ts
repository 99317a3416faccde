import type { IncomingHttpHeaders } from "node:http";
import { MAX_TIMER_MS } from "../clock.js";

/**
 * The longest deadline a call is held to: setTimeout's longest delay (2^31 − 1 ms, 24.8
 * days). Node fires a longer timer after 1 ms (and writes a TimeoutOverflowWarning to stderr
 * each time), so a client asking for a 30-day deadline (`grpc-timeout: 720H`, or up to
 * `99999999H` and `connect-timeout-ms: 9999999999`, all valid) had its call, a Health/Watch
 * or WatchRevocations stream too, ended DEADLINE_EXCEEDED at once, and any client could
 * write a line to the server's stderr per call. A longer deadline is held as this one.
 */
export const MAX_DEADLINE_MS = MAX_TIMER_MS;

/** The gRPC timeout units, in ms (as Connect's parseTimeout reads them). */
const GRPC_UNIT_MS: Readonly<Record<string, number>> = { H: 3_600_000, M: 60_000, S: 1000 };

/**
 * Rewrite, in `headers`, a `grpc-timeout` or `connect-timeout-ms` whose deadline is past
 * {@link MAX_DEADLINE_MS} to that longest deadline, before Connect's handlers (which arm a
 * timer for it) read them. Malformed values are left for Connect to refuse.
 */
export function boundDeadlineHeaders(headers: IncomingHttpHeaders): void {
  const grpc = headers["grpc-timeout"];
  if (typeof grpc === "string" && grpc.length > 1) {
    const unit = GRPC_UNIT_MS[grpc[grpc.length - 1]!];
    const digits = grpc.slice(0, -1);
    if (unit !== undefined && /^\d{1,8}$/.test(digits) && Number(digits) * unit > MAX_DEADLINE_MS)
      headers["grpc-timeout"] = `${Math.floor(MAX_DEADLINE_MS / 1000)}S`;
  }
  const connect = headers["connect-timeout-ms"];
  if (typeof connect === "string" && /^\d{1,10}$/.test(connect) && Number(connect) > MAX_DEADLINE_MS)
    headers["connect-timeout-ms"] = String(MAX_DEADLINE_MS);
}
