import { hash } from "node:crypto";
import { Redis } from "ioredis";
import {
  type RateLimiterAbstract,
  RateLimiterMemory,
  RateLimiterRedis,
  RateLimiterRes,
} from "rate-limiter-flexible";
import type { Principal } from "./auth/principal.js";
import { budgetKey } from "./client-ip.js";
import type { Config } from "./config.js";
import { TesseraError } from "./errors.js";

/** Outcome of one counted request. */
export interface LimitResult {
  allowed: boolean;
  limit: number;
  remaining: number;
  /** Milliseconds until the window resets. */
  resetMs: number;
  /** Points counted in the window, this request's included. */
  consumed?: number;
  /** When the window this request was counted in ends (ms since the epoch). */
  windowEnd?: number;
}

/** A fixed-window limiter over rate-limiter-flexible (memory, or Redis to share between instances). */
export class Limiter {
  /** Requests this limiter refused since start (metrics read it when scraped). */
  refused = 0;

  constructor(
    private readonly impl: RateLimiterAbstract,
    readonly limit: number,
    /** What it limits, as the `limiter` label of `tessera_rate_limit_refusals_total` names it. */
    readonly name = "unnamed",
  ) {}

  /** Count one request for `key`. */
  async consume(key: string): Promise<LimitResult> {
    try {
      const res = await this.impl.consume(key);
      return {
        allowed: true,
        limit: this.limit,
        remaining: res.remainingPoints,
        resetMs: res.msBeforeNext,
        consumed: res.consumedPoints,
        windowEnd: Date.now() + res.msBeforeNext,
      };
    } catch (res) {
      if (res instanceof RateLimiterRes) {
        this.refused++;
        return { allowed: false, limit: this.limit, remaining: 0, resetMs: res.msBeforeNext };
      }
      throw res;
    }
  }

  /**
   * Give back one point counted for `key` (a reservation that was not spent) by `taken`, the
   * result that counted it: only while its window lasts. A point given back after the
   * window rolled over would be credit in the next one (a budget of 20 becoming 40 for
   * whoever makes its checks finish just past the window's end).
   */
  async refund(key: string, taken: LimitResult): Promise<void> {
    if (taken.windowEnd !== undefined && Date.now() >= taken.windowEnd) return;
    await this.impl.reward(key, 1);
  }

  /** Forget `key`'s count (and any block on it). */
  async reset(key: string): Promise<void> {
    await this.impl.delete(key);
  }

  /** Refuse `key` for `seconds`, whatever its count. */
  async block(key: string, seconds: number): Promise<void> {
    await this.impl.block(key, seconds);
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
  /** Password checks: budget reserved per IP, per username and per username at an IP before PBKDF2. */
  passwords: PasswordGuard;
  /** New secrets (tokens, API keys, machine credentials) per principal per hour: each costs a PBKDF2. */
  credentialCreations: Limiter;
  /** Requests refused since start, by limiter name (every limiter, the password guard's included). */
  refusals(): Record<string, number>;
  close(): Promise<void>;
}

/** What became of a password check whose budget {@link PasswordGuard.reserve} reserved. */
export interface PasswordAttempt {
  /** The password matched (and the principal may act): the reservation is refunded, the IP's consecutive failures at the username forgotten. */
  succeeded(): Promise<void>;
  /** Refused: the reservation is spent; the IP's last allowed consecutive failure at the username locks it out of that username. */
  failed(): Promise<void>;
  /** No verdict (a fault, or the hash pool was full): the reservation is refunded. */
  cancelled(): Promise<void>;
}

/** Sizes of the {@link PasswordGuard}'s lockout of an IP from a username. */
export interface LockoutOptions {
  /** Consecutive failures from one IP at one username before a lockout. */
  failures: number;
  /** First lockout; each further one within a day doubles it. */
  seconds: number;
  maxSeconds: number;
}

const ONE_DAY = 24 * 3600;

/**
 * The failed-authentication budget of password checks (Login, HTTP Basic, ChangePassword),
 * reserved atomically *before* PBKDF2 and refunded on success: concurrent guesses cannot
 * all get a verdict, as they could when the budget was read before the ~200 ms hash and
 * spent after it. Three counts (OWASP ASVS V6.3 / 4.0 §2.2.1):
 *
 * - per IP (`authFailuresPerIpPerMinute`, shared with bad tokens): one address guesses
 *   little, whatever the usernames;
 * - per username, from every address together (`authFailuresPerUsernamePerHour`, a fixed
 *   hour): many addresses cannot guess one account much either;
 * - per username at one IP, consecutive failures within an hour
 *   (`authFailuresPerUsernamePerIp`), with a lockout of that IP from that username that
 *   doubles each time (`lockoutSeconds` up to `maxLockoutSeconds`; the doubling starts
 *   again a day after the first lockout, and both start again on a success).
 *
 * Why the growing lockout is per username *and IP*, and the per-username one is not
 * growing: a growing per-username lockout would let one address keep a victim locked out
 * for ever at the cost of a few guesses a day. Here one address only locks *itself* out of
 * the account for longer and longer (with the defaults, at most about 30 guesses an hour at
 * one account, below the 100 that refuse the username to everyone), so shutting a victim
 * out needs several addresses at once, and lasts at most until the hour ends.
 *
 * Usernames are keyed by their SHA-256, so keys are short and no username is kept in clear.
 */
export class PasswordGuard {
  constructor(
    private readonly perIp: Limiter,
    private readonly perUsername: Limiter,
    private readonly perUsernameIp: Limiter,
    /** Lockouts of an IP from a username in the last day (for the doubling). */
    private readonly lockouts: Limiter,
    private readonly lockout: LockoutOptions,
  ) {}

  /**
   * Reserve one failure of budget for a password check of `username` from `address`
   * (counted under its {@link budgetKey}: an IPv6 client's whole /64).
   * @throws TesseraError RATE_LIMITED (with Retry-After) when any of the three is spent
   */
  async reserve(address: string, username: string): Promise<PasswordAttempt> {
    const ip = budgetKey(address);
    const user = hash("sha256", username, "base64url");
    const pair = `${ip}|${user}`;
    const byIp = await this.perIp.consume(ip);
    if (!byIp.allowed) throw authFailuresError(byIp);
    const byPair = await this.perUsernameIp.consume(pair);
    if (!byPair.allowed) {
      await this.perIp.refund(ip, byIp);
      // Until the lockout is set (the failure that earns it may still be hashing) the count's
      // window is an hour long: Retry-After says no more than the longest lockout.
      throw authFailuresError({
        ...byPair,
        resetMs: Math.min(byPair.resetMs, this.lockout.maxSeconds * 1000),
      });
    }
    const byUser = await this.perUsername.consume(user);
    if (!byUser.allowed) {
      await Promise.all([this.perIp.refund(ip, byIp), this.perUsernameIp.refund(pair, byPair)]);
      throw authFailuresError(byUser);
    }
    let settled = false;
    const once = (fn: () => Promise<unknown>) => async () => {
      if (settled) return;
      settled = true;
      await fn();
    };
    return {
      succeeded: once(() =>
        Promise.all([
          this.perIp.refund(ip, byIp),
          this.perUsername.refund(user, byUser),
          this.perUsernameIp.reset(pair),
          this.lockouts.reset(pair),
        ]),
      ),
      failed: once(async () => {
        // The reservation that used the last allowed failure locks the IP out of the username.
        if ((byPair.consumed ?? 0) < this.lockout.failures) return;
        const round = (await this.lockouts.consume(pair)).consumed ?? 1;
        const seconds = Math.min(
          this.lockout.maxSeconds,
          this.lockout.seconds * 2 ** Math.min(30, round - 1),
        );
        await this.perUsernameIp.block(pair, seconds);
      }),
      cancelled: once(() =>
        Promise.all([
          this.perIp.refund(ip, byIp),
          this.perUsername.refund(user, byUser),
          this.perUsernameIp.refund(pair, byPair),
        ]),
      ),
    };
  }
}

/** The refusal of a password check (or credential) whose failure budget is spent. */
export function authFailuresError(result: LimitResult): TesseraError {
  return rateLimitedError(result, "too many failed authentication attempts; try again later");
}

/**
 * Count one new secret (token, API key, machine credential) created by `principal`, before
 * its PBKDF2: hashing new secrets is work any user may ask for, and unbounded it would keep
 * the hash pool from verifying anyone's password.
 * @throws TesseraError RATE_LIMITED (with Retry-After) past `rateLimit.credentialCreationsPerHour`
 */
export async function countCredentialCreation(
  limits: RateLimits | undefined,
  principal: Principal,
): Promise<void> {
  if (!limits) return;
  const result = await limits.credentialCreations.consume(`${principal.kind}:${principal.id}`);
  if (!result.allowed) throw rateLimitedError(result, "too many credentials created; try again later");
}

/** Where the limiters report Redis going away and coming back. */
export interface RedisStateLog {
  warn(msg: string): void;
  info(msg: string): void;
}

/**
 * Whether Redis answers, as the limiters' calls find it: the first failure (an error, or
 * no answer within the deadline) logs "Redis unavailable, limiting per instance" once,
 * and for the next second every call goes straight to the in-process limiter instead of
 * waiting for its own deadline; then one call at a time tries Redis again, and the first
 * that succeeds logs "Redis back" once.
 */
export class RedisState {
  private down = false;
  private retryAt = 0;
  private probing = false;

  constructor(
    private readonly log: RedisStateLog,
    private readonly retryMs = 1000,
    private readonly now: () => number = Date.now,
  ) {}

  /** Whether Redis is considered available now. */
  get available(): boolean {
    return !this.down;
  }

  /** Run one Redis call, or refuse it at once while Redis is known to be away. */
  async run<T>(call: () => Promise<T>): Promise<T> {
    let probe = false;
    if (this.down) {
      if (this.probing || this.now() < this.retryAt) throw new Error("Redis unavailable");
      this.probing = probe = true;
    }
    try {
      const result = await call();
      if (this.down) {
        this.down = false;
        this.log.info("Redis back");
      }
      return result;
    } catch (err) {
      this.retryAt = this.now() + this.retryMs;
      if (!this.down) {
        this.down = true;
        this.log.warn("Redis unavailable, limiting per instance");
      }
      throw err;
    } finally {
      if (probe) this.probing = false;
    }
  }
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
  const state = new RedisState(options.logger ?? { warn() {}, info() {} });
  const made: Limiter[] = [];
  const make = (keyPrefix: string, points: number, duration = 60): Limiter => {
    const limiter = makeLimiter(keyPrefix, points, duration);
    made.push(limiter);
    return limiter;
  };
  const makeLimiter = (keyPrefix: string, points: number, duration: number): Limiter => {
    const memory = new RateLimiterMemory({ keyPrefix, points, duration });
    if (!config.redisUrl) return new Limiter(memory, points, keyPrefix);
    if (!redis) {
      redis = new Redis(config.redisUrl, {
        enableOfflineQueue: false,
        lazyConnect: false,
        maxRetriesPerRequest: 1,
        // ioredis waits for ever by default: a Redis that accepts connections and never
        // answers held every request for 20 s and more. Past the deadline the call fails
        // and the limiter's insurance (per-instance memory) answers instead.
        commandTimeout: config.redisTimeoutMs,
        connectTimeout: Math.max(1000, config.redisTimeoutMs),
      });
      // Failures are reported through RedisState; without a listener ioredis prints each one.
      redis.on("error", () => undefined);
    }
    // The memory limiter insures against Redis outages: limits stay enforced per instance.
    const shared = new RateLimiterRedis({
      storeClient: redis,
      keyPrefix: `tessera:${keyPrefix}`,
      points,
      duration,
      insuranceLimiter: memory,
    });
    // Every call reaching Redis goes through RedisState (fail fast while Redis is away, log
    // the transitions); its failure is what makes rate-limiter-flexible ask the insurance.
    const store = shared as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    for (const name of REDIS_STORE_CALLS) {
      const call = store[name]!.bind(shared);
      store[name] = (...args) => state.run(() => call(...args));
    }
    return new Limiter(shared, points, keyPrefix);
  };
  const authFailures = make("authfail", config.authFailuresPerIpPerMinute);
  return {
    perIp: make("ip", config.perIpPerMinute),
    perPrincipal: make("principal", config.perPrincipalPerMinute),
    authFailures,
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
    ),
    refusals() {
      const out: Record<string, number> = {};
      for (const l of made) out[l.name] = (out[l.name] ?? 0) + l.refused;
      return out;
    },
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
