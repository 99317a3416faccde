import { Redis } from "ioredis";
import {
  type RateLimiterAbstract,
  RateLimiterMemory,
  RateLimiterRedis,
  RateLimiterRes,
} from "rate-limiter-flexible";
import type { Config } from "./config.js";
import { TesseraError } from "./errors.js";

/** Outcome of one counted request. */
export interface LimitResult {
  allowed: boolean;
  limit: number;
  remaining: number;
  /** Milliseconds until the window resets. */
  resetMs: number;
}

/** A fixed-window limiter over rate-limiter-flexible (memory, or Redis to share between instances). */
export class Limiter {
  constructor(
    private readonly impl: RateLimiterAbstract,
    readonly limit: number,
  ) {}

  /** Count one request for `key`. */
  async consume(key: string): Promise<LimitResult> {
    try {
      const res = await this.impl.consume(key);
      return { allowed: true, limit: this.limit, remaining: res.remainingPoints, resetMs: res.msBeforeNext };
    } catch (res) {
      if (res instanceof RateLimiterRes)
        return { allowed: false, limit: this.limit, remaining: 0, resetMs: res.msBeforeNext };
      throw res;
    }
  }

  /** Whether `key` has used up its window, without counting a request. */
  async exhausted(key: string): Promise<LimitResult | null> {
    const res = await this.impl.get(key);
    if (res && res.consumedPoints >= this.limit)
      return { allowed: false, limit: this.limit, remaining: 0, resetMs: res.msBeforeNext };
    return null;
  }
}

/** The limits the edge enforces. */
export interface RateLimits {
  perIp: Limiter;
  perPrincipal: Limiter;
  /** Failed authentications per IP: bounds password guessing and PBKDF2 work. */
  authFailures: Limiter;
  close(): Promise<void>;
}

/** Build the limiters from configuration (Redis when rateLimit.redisUrl is set). */
export function createRateLimits(config: Config["rateLimit"]): RateLimits {
  let redis: Redis | undefined;
  const make = (keyPrefix: string, points: number): Limiter => {
    const memory = new RateLimiterMemory({ keyPrefix, points, duration: 60 });
    if (!config.redisUrl) return new Limiter(memory, points);
    redis ??= new Redis(config.redisUrl, {
      enableOfflineQueue: false,
      lazyConnect: false,
      maxRetriesPerRequest: 1,
    });
    // The memory limiter insures against Redis outages: limits stay enforced per instance.
    const shared = new RateLimiterRedis({
      storeClient: redis,
      keyPrefix: `tessera:${keyPrefix}`,
      points,
      duration: 60,
      insuranceLimiter: memory,
    });
    return new Limiter(shared, points);
  };
  return {
    perIp: make("ip", config.perIpPerMinute),
    perPrincipal: make("principal", config.perPrincipalPerMinute),
    authFailures: make("authfail", config.authFailuresPerIpPerMinute),
    async close() {
      redis?.disconnect();
    },
  };
}

/** Headers describing a limit (seed 003): X-RateLimit-Limit/Remaining/Reset. */
export function rateLimitHeaders(result: LimitResult): Record<string, string> {
  return {
    "x-ratelimit-limit": String(result.limit),
    "x-ratelimit-remaining": String(Math.max(0, result.remaining)),
    "x-ratelimit-reset": String(Math.ceil(result.resetMs / 1000)),
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
