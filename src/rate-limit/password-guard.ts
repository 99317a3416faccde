// The failed-password budget: reserved before PBKDF2 and refunded on success, per IP, per
// username and per username at an IP with a growing lockout, so concurrent guesses gain nothing;
// and the per-username budget of checks that succeed, so no account keeps the hash pool busy.
import { hash } from "node:crypto";
import { budgetKey } from "../client-ip.js";
import type { Limiter } from "./limiter.js";
import { authFailuresError, rateLimitedError } from "./refusal.js";

/** What became of a password check whose budget {@link PasswordGuard.reserve} reserved. */
export interface PasswordAttempt {
  /** The password matched (and the principal may act): the reservation is refunded, the IP's consecutive failures at the username forgotten. */
  succeeded(): Promise<void>;
  /** Refused: the reservation is spent; the IP's last allowed consecutive failure at the username locks it out of that username. */
  failed(): Promise<void>;
  /** No verdict (a fault, or the hash pool was full): the reservation is refunded. */
  cancelled(): Promise<void>;
}

/** What {@link PasswordGuard.reserve} counts beside the failure budgets. */
export interface ReserveOptions {
  /**
   * Also count the check against the username's budget of password checks, kept when the
   * password is right: for checks that cost a PBKDF2 every time (Login, ChangePassword).
   * HTTP Basic leaves it out: the verified-secret cache answers a right password again
   * without hashing, and concurrent first uses share one hash.
   */
  everyCheck?: boolean;
  /**
   * The secret was generated, not chosen (a machine user's Basic password, 192 random bits):
   * the username's budget from every address together is left out. That budget bounds how
   * many guesses many addresses make at one chosen password; a generated one is out of
   * reach of any number of them, and the budget would only let whoever knows the username
   * (it is no secret) spend it and refuse a credential not yet verified (not in the
   * verified-secret cache) for the rest of the hour. The per-IP budget and the lockout of
   * an IP from the username still bound what each address hashes.
   */
  generatedSecret?: boolean;
}

/** Sizes of the {@link PasswordGuard}'s lockout of an IP from a username. */
export interface LockoutOptions {
  /** Consecutive failures from one IP at one username before a lockout. */
  failures: number;
  /** First lockout; each further one within a day doubles it. */
  seconds: number;
  maxSeconds: number;
}

/**
 * The failed-authentication budget of password checks (Login, HTTP Basic, ChangePassword),
 * reserved atomically *before* PBKDF2 and refunded on success: concurrent guesses cannot
 * all get a verdict, as they could when the budget was read before the (slow) hash and
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
 * The failure budgets bound wrong passwords only: a right one gives its points back. Checks
 * that hash every time (Login, ChangePassword) also reserve a point of the username's
 * budget of checks (`passwordChecksPerUsernamePerMinute`, from every address together),
 * which a right password keeps and a wrong one gives back: the holder of one account's
 * password cannot loop its logins to keep the shared hash pool full and everyone else's
 * logins refused. Wrong passwords are given back so that this budget adds no lockout: a
 * guesser only holds it while its guesses hash, and the failure budgets bound those.
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
    /** Password checks per username, right ones included (see {@link ReserveOptions.everyCheck}). */
    private readonly checks?: Limiter,
  ) {}

  /**
   * Reserve one failure of budget for a password check of `username` from `address`
   * (counted under its {@link budgetKey}: an IPv6 client's whole /64).
   * With `everyCheck`, one check of the username's budget of checks as well.
   * @throws TesseraError RATE_LIMITED (with Retry-After) when any of them is spent
   */
  async reserve(address: string, username: string, options: ReserveOptions = {}): Promise<PasswordAttempt> {
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
    const byUser = options.generatedSecret ? undefined : await this.perUsername.consume(user);
    if (byUser && !byUser.allowed) {
      await Promise.all([this.perIp.refund(ip, byIp), this.perUsernameIp.refund(pair, byPair)]);
      throw authFailuresError(byUser);
    }
    const refundUser = async () => {
      if (byUser) await this.perUsername.refund(user, byUser);
    };
    const checks = options.everyCheck ? this.checks : undefined;
    const byCheck = await checks?.consume(user);
    if (byCheck && !byCheck.allowed) {
      await Promise.all([this.perIp.refund(ip, byIp), this.perUsernameIp.refund(pair, byPair), refundUser()]);
      throw rateLimitedError(byCheck, "too many password checks for this account; try again later");
    }
    const refundCheck = async () => {
      if (checks && byCheck) await checks.refund(user, byCheck);
    };
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
          refundUser(),
          this.perUsernameIp.reset(pair),
          this.lockouts.reset(pair),
        ]),
      ),
      failed: once(async () => {
        await refundCheck();
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
          refundUser(),
          this.perUsernameIp.refund(pair, byPair),
          refundCheck(),
        ]),
      ),
    };
  }
}
