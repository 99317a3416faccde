// The limits the edge enforces, built from configuration: per IP, per principal, failed
// authentications, password checks and credential creations, in memory or shared via Redis.
import { Redis } from "ioredis";
import { RateLimiterMemory, RateLimiterRedis } from "rate-limiter-flexible";
import type { Principal } from "./auth/principal.js";
import { budgetKey } from "./client-ip.js";
import type { Config } from "./config.js";
import type { TesseraError } from "./errors.js";
import { Limiter } from "./rate-limit/limiter.js";
import { LocalCount } from "./rate-limit/local-count.js";
import { PasswordGuard } from "./rate-limit/password-guard.js";
import { watchFirstConnection } from "./rate-limit/redis-connection.js";
import { RedisState, type RedisStateLog } from "./rate-limit/redis-state.js";
import { authFailuresError, rateLimitedError } from "./rate-limit/refusal.js";

export { Limiter, type LimitResult } from "./rate-limit/limiter.js";
export {
  type LockoutOptions,
  type PasswordAttempt,
  PasswordGuard,
  type ReserveOptions,
} from "./rate-limit/password-guard.js";
export { RedisState, type RedisStateLog } from "./rate-limit/redis-state.js";

const ONE_DAY = 24 * 3600;

export {
  authFailuresError,
  rateLimitedError,
  rateLimitHeaders,
  rateLimitValues,
  tooManyStreamsError,
} from "./rate-limit/refusal.js";

/** The limits the edge enforces. */
export interface RateLimits {
  perIp: Limiter;
  perPrincipal: Limiter;
  /** Failed authentications per IP: bounds password guessing and PBKDF2 work. */
  authFailures: Limiter;
  /** Failed VerifyCredential verifications per verifying caller, across the client addresses it names. */
  verifyFailures: Limiter;
  /** Password checks: budget reserved per IP, per username and per username at an IP before PBKDF2 (and, right ones included, per username). */
  passwords: PasswordGuard;
  /** New secrets (tokens, API keys, machine credentials) per principal per hour: each costs a PBKDF2. */
  credentialCreations: Limiter;
  /** Requests refused since start, by limiter name (every limiter, the password guard's included). */
  refusals(): Record<string, number>;
  /** Calls counted in this instance's memory since start because Redis did not answer, by limiter name (empty without Redis). */
  countedLocally(): Record<string, number>;
  /**
   * Resolves once the limiters count in Redis (true, at once without Redis), or false when
   * Redis refused the first connection or did not answer within `max(1000,
   * redisTimeoutMs)` ms: they then count per instance, and that is logged once. The start
   * awaits it before listening, so that a fleet started together shares its budgets from
   * the first call.
   */
  connected(): Promise<boolean>;
  /** Whether the limits are shared through Redis now (undefined without Redis). */
  shared(): boolean | undefined;
  close(): Promise<void>;
}

/**
 * Count one new secret (token, API key, machine credential, password) created by
 * `principal`, before its PBKDF2: hashing new secrets is work any user may ask for, and
 * unbounded it would keep the hash pool from verifying anyone's password. Returns the
 * refund of this count, for a call that turns out to create nothing (ChangePassword with a
 * wrong current password).
 * @throws TesseraError RATE_LIMITED (with Retry-After) past `rateLimit.credentialCreationsPerHour`
 */
export async function countCredentialCreation(
  limits: RateLimits | undefined,
  principal: Principal,
): Promise<() => Promise<void>> {
  if (!limits) return noRefund;
  const key = `${principal.kind}:${principal.id}`;
  const result = await limits.credentialCreations.consume(key);
  if (!result.allowed) throw rateLimitedError(result, "too many credentials created; try again later");
  return () => limits.credentialCreations.refund(key, result);
}

async function noRefund(): Promise<void> {}

/**
 * The RATE_LIMITED refusal a password check from `address` gets anyway, decided without
 * the store: this instance has seen the address spend its per-IP request limit or its
 * failed-authentication budget (Limiter.spentNow), and the window has not ended. Used
 * where a check is refused before its budget is reserved because the hash pool is full
 * (admission/shedding.ts, HTTP Basic), so that a spent address gets the 429 and the
 * Retry-After of its budget, as it would with room in the pool. Counted as that limiter's
 * refusal. Undefined when this instance knows of no spent budget of the address.
 */
export function spentAddressRefusal(limits: RateLimits, address: string): TesseraError | undefined {
  const { perIp, authFailures } = limits;
  if (!perIp.anySpent && !authFailures.anySpent) return undefined;
  const key = budgetKey(address);
  const requests = perIp.spentNow(key);
  if (requests !== undefined) {
    perIp.refused++;
    return rateLimitedError(requests);
  }
  const failures = authFailures.spentNow(key);
  if (failures === undefined) return undefined;
  authFailures.refused++;
  return authFailuresError(failures);
}

/** The calls of RateLimiterRedis that reach Redis (undocumented, stable across v5–v11). */
const REDIS_STORE_CALLS = ["_upsert", "_get", "_delete"] as const;

/** Options for {@link createRateLimits}. */
export interface CreateRateLimitsOptions {
  /** Where Redis state changes are logged (default: nowhere). */
  logger?: RedisStateLog;
}

/** Build the limiters from configuration (Redis when rateLimit.redisUrl is set). */
export function createRateLimits(
  config: Config["rateLimit"],
  options: CreateRateLimitsOptions = {},
): RateLimits {
  let redis: Redis | undefined;
  let firstConnection: ((boundMs: number) => Promise<boolean>) | undefined;
  // ioredis's own bound on connecting: the start waits no longer for the first connection.
  const connectTimeout = Math.max(1000, config.redisTimeoutMs);
  const state = new RedisState(
    options.logger ?? { warn() {}, info() {} },
    1000,
    Date.now,
    config.redisTimeoutMs,
  );
  const made: Limiter[] = [];
  const make = (keyPrefix: string, points: number, duration = 60): Limiter => {
    const limiter = makeLimiter(keyPrefix, points, duration);
    made.push(limiter);
    return limiter;
  };
  const makeLimiter = (keyPrefix: string, points: number, duration: number): Limiter => {
    if (!config.redisUrl)
      return new Limiter(new RateLimiterMemory({ keyPrefix, points, duration }), points, keyPrefix);
    if (!redis) {
      redis = new Redis(config.redisUrl, {
        enableOfflineQueue: false,
        lazyConnect: false,
        maxRetriesPerRequest: 1,
        // ioredis waits for ever by default: a Redis that accepts connections and never
        // answers held every request for 20 s and more. The deadline is RedisState's (past
        // it the call fails and the limiter's insurance, per-instance memory, answers); this
        // one only bounds how long a command abandoned there stays queued in ioredis.
        commandTimeout: Math.max(1000, 10 * config.redisTimeoutMs),
        connectTimeout,
      });
      // Failures are reported through RedisState; without a listener ioredis prints each one.
      redis.on("error", () => undefined);
      firstConnection = watchFirstConnection(redis);
    }
    const shared = new RateLimiterRedis({
      storeClient: redis,
      keyPrefix: `tessera:${keyPrefix}`,
      points,
      duration,
    });
    // Every call reaching Redis goes through RedisState (fail fast while Redis is away, log
    // the transitions); its failure is what makes the Limiter count in memory instead, from
    // Redis's last count (LocalCount), not from zero as an insurance limiter would.
    const store = shared as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    for (const name of REDIS_STORE_CALLS) {
      const call = store[name]!.bind(shared);
      store[name] = (...args) => state.run(() => call(...args));
    }
    return new Limiter(shared, points, keyPrefix, new LocalCount(points, duration * 1000));
  };
  const authFailures = make("authfail", config.authFailuresPerIpPerMinute);
  return {
    perIp: make("ip", config.perIpPerMinute),
    perPrincipal: make("principal", config.perPrincipalPerMinute),
    authFailures,
    verifyFailures: make("verify-failures", config.verifyFailuresPerCallerPerMinute),
    credentialCreations: make("credential-creations", config.credentialCreationsPerHour, 3600),
    passwords: new PasswordGuard(
      authFailures,
      make("authfail-user", config.authFailuresPerUsernamePerHour, 3600),
      // An hour, not a day: keys for usernames nobody has are made by guessing, and memory
      // holds them until they expire.
      make("authfail-user-ip", config.authFailuresPerUsernamePerIp, 3600),
      make("lockouts", Number.MAX_SAFE_INTEGER, ONE_DAY),
      {
        failures: config.authFailuresPerUsernamePerIp,
        seconds: config.lockoutSeconds,
        maxSeconds: config.maxLockoutSeconds,
      },
      make("password-checks", config.passwordChecksPerUsernamePerMinute),
    ),
    refusals() {
      const out: Record<string, number> = {};
      for (const l of made) out[l.name] = (out[l.name] ?? 0) + l.refused;
      return out;
    },
    countedLocally() {
      const out: Record<string, number> = {};
      if (redis) for (const l of made) out[l.name] = (out[l.name] ?? 0) + l.countedLocally;
      return out;
    },
    async connected() {
      if (!firstConnection) return true;
      const ok = await firstConnection(connectTimeout);
      if (!ok) state.unavailable();
      return ok;
    },
    shared() {
      // ioredis knows of a closed connection before any call fails on it.
      return redis ? redis.status === "ready" && state.available : undefined;
    },
    async close() {
      redis?.disconnect();
    },
  };
}
