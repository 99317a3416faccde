import type { HandlerContext } from "@connectrpc/connect";
import { budgetKey } from "../client-ip.js";
import { requestState } from "../context.js";
import { TesseraError } from "../errors.js";
import { type RateLimits, rateLimitedError } from "../rate-limit.js";

/** What bounds the request messages of one client or bidi stream. */
export interface StreamMessageBounds {
  /** `server.maxStreamMessages` (0: no limit on the count). */
  max: number;
  /** The per-IP budget each message after the first is counted against (undefined: rate limits off). */
  limits: RateLimits | undefined;
}

/**
 * A client or bidi stream's request messages, bounded. Admission counts a call once, yet
 * every message of such a stream is work of its own, answered like a call (a public
 * reflection request of a few bytes is answered with tens of KB): unbounded, one anonymous
 * stream within `server.maxBodyBytes` made the server answer thousands of them. So each
 * message after the first is counted against the caller's per-IP budget as a call is, and
 * past `max` messages the stream ends with ResourceExhausted (MESSAGE_TOO_LARGE).
 */
export async function* boundedMessages<T>(
  messages: AsyncIterable<T>,
  context: HandlerContext,
  bounds: StreamMessageBounds,
): AsyncGenerator<T> {
  let n = 0;
  for await (const message of messages) {
    n++;
    if (bounds.max > 0 && n > bounds.max)
      throw new TesseraError(
        "MESSAGE_TOO_LARGE",
        `more than ${bounds.max} request messages on one stream (server.maxStreamMessages)`,
      );
    if (n > 1 && bounds.limits !== undefined) {
      const result = await bounds.limits.perIp.consume(budgetKey(requestState(context.values).ip));
      if (!result.allowed) throw rateLimitedError(result);
    }
    yield message;
  }
}
