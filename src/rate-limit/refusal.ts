// How a refused request is answered: RATE_LIMITED with the limit's headers and Retry-After,
// the same for every limiter.
import { TesseraError } from "../errors.js";
import type { LimitResult } from "./limiter.js";

/** Headers describing a limit (seed 003): X-RateLimit-Limit/Remaining/Reset. */
export function rateLimitHeaders(result: LimitResult): Record<string, string> {
  const values = rateLimitValues(result);
  return {
    "x-ratelimit-limit": String(values["x-ratelimit-limit"]),
    "x-ratelimit-remaining": String(values["x-ratelimit-remaining"]),
    "x-ratelimit-reset": String(values["x-ratelimit-reset"]),
  };
}

/**
 * The same headers with their values as numbers (each header's text is the number's): what
 * an admitted call's answer carries, set on it as they are (transport/call-context.ts), so
 * the fast transport writes them with the answer without making their text itself.
 */
export function rateLimitValues(result: LimitResult): {
  "x-ratelimit-limit": number;
  "x-ratelimit-remaining": number;
  "x-ratelimit-reset": number;
} {
  return {
    "x-ratelimit-limit": result.limit,
    "x-ratelimit-remaining": Math.max(0, result.remaining),
    "x-ratelimit-reset": Math.ceil(result.resetMs / 1000),
  };
}

/** The error for a refused request, with Retry-After. */
export function rateLimitedError(
  result: LimitResult,
  message = "Too many requests. Please try again later.",
): TesseraError {
  return new TesseraError("RATE_LIMITED", message, {
    headers: {
      ...rateLimitHeaders(result),
      "retry-after": String(Math.max(1, Math.ceil(result.resetMs / 1000))),
    },
  });
}

/** The refusal of a password check (or credential) whose failure budget is spent. */
export function authFailuresError(result: LimitResult): TesseraError {
  return rateLimitedError(result, "too many failed authentication attempts; try again later");
}

/**
 * The refusal of a streaming call past `server.maxStreamsPerIp`. RATE_LIMITED, not a size
 * limit: the same call passes once one of the address's streams ends, which no one can
 * date, so Retry-After is the shortest wait (a refusal costs a header read, nothing more).
 */
export function tooManyStreamsError(): TesseraError {
  return new TesseraError("RATE_LIMITED", "too many streaming calls open from this address", {
    headers: { "retry-after": "1" },
  });
}
