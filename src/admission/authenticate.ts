import { hash, randomBytes } from "node:crypto";
import { Code } from "@connectrpc/connect";
import type { Authenticator } from "../auth/authenticator.js";
import type { Awaitable } from "../auth/awaitable.js";
import type { PresentedCredential } from "../auth/credentials.js";
import { hashPool } from "../auth/hash-pool.js";
import { MACHINE_USERNAME_PREFIX } from "../auth/machine-principal.js";
import type { Principal } from "../auth/principal.js";
import { budgetKey } from "../client-ip.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import {
  authFailuresError,
  type Limiter,
  type LimitResult,
  type PasswordAttempt,
  type RateLimits,
  spentAddressRefusal,
} from "../rate-limit.js";

/** A failure budget: a limiter and the key counted on it. */
export interface FailureBudget {
  limiter: Limiter;
  key: string;
}

/** What authentication needs: the verifiers, and the budgets when rate limits are on. */
export interface AuthenticationDeps {
  authenticator: Authenticator;
  /** When set: failed authentications counted per IP, and password checks' budgets reserved before PBKDF2 (rate-limit.ts). */
  limits?: RateLimits | undefined;
  /**
   * A budget every failure also spends, after the address's (`state.ip`) and only when that
   * one allowed it: VerifyCredential's per-caller budget when the caller names its client's
   * address, so that each client address runs out alone while the caller's total stays bounded.
   */
  wider?: FailureBudget | undefined;
}

/**
 * Authenticate `credential` (null: none sent, the connection's bound certificate may stand
 * for it), within the IP's failed-authentication budget when rate limits are on. Sets
 * `state.principal`. Admission (index.ts), OAuth and VerifyCredential all come here.
 *
 * The refusal is returned rather than thrown. Why: refusing is what a public API does most
 * under attack, and a throw that crosses async frames is costly in V8 (each frame rejects
 * its promise, and a throw looks up the stack for a handler).
 * @returns undefined once `state.principal` is set; otherwise the refusal (AUTH_REQUIRED,
 *   a credential refusal, or RATE_LIMITED once the IP's failed-authentication budget is
 *   spent). Synchronously when the verifiers decided without I/O (a credential the caches
 *   know, see auth/awaitable.ts), else a promise of it that never rejects.
 */
export function authenticationRefusal(
  deps: AuthenticationDeps,
  credential: PresentedCredential | null,
  state: RequestState,
): unknown {
  const { authenticator, limits } = deps;
  // `Authorization: Bearer` and `X-API-Key` carry the same tokens: one path and one budget
  // for both (an X-API-Key that skipped the reservation below reached PBKDF2 past the budget).
  const token = credential !== null && credential.type !== "basic" ? credential.token : undefined;
  if (token !== undefined) {
    // A token already refused (a replayed forgery) is refused without any throw.
    const known = authenticator.knownRefusal(credential!);
    if (known !== undefined) return limits ? spendFailure(limits, state, known, deps.wider) : known;
  }
  if (limits === undefined) return verdictOf(authenticator, credential, state);
  // A password: budget reserved before PBKDF2 (rate-limit.ts, PasswordGuard).
  if (credential?.type === "basic")
    return verifyOnce(deps, credential, state, passwordIdentity(credential), () =>
      limits.passwords.reserve(state.ip, credential.username, {
        generatedSecret: credential.username.startsWith(MACHINE_USERNAME_PREFIX),
      }),
    );
  // An opaque token is first verified with hashing refused: one verified before (or one that
  // needs no PBKDF2 to refuse) is decided so, whatever its IP spent. One that needs PBKDF2
  // reserves a point of the IP's failure budget first (reserveTokenFailure). A JWT (or a
  // certificate) never needs PBKDF2, so a valid one is accepted whatever its IP spent: one
  // guesser behind a NAT does not lock out everyone behind it. (A JWT verified before is
  // known as one without the regex over it, a measurable share of a call.)
  const verdict =
    token !== undefined && !authenticator.isKnownJwt(token) && !JWT_SHAPE.test(token)
      ? knownCredential(deps, credential!, state)
      : verdictOf(authenticator, credential, state);
  if (verdict instanceof Promise)
    return verdict.then((v: unknown) => withinBudget(deps, limits, credential, state, v));
  return withinBudget(deps, limits, credential, state, verdict);
}

/** A verdict reached with hashing refused, its failure spent; PBKDF2 within the budget when it needs it. */
function withinBudget(
  deps: AuthenticationDeps,
  limits: RateLimits,
  credential: PresentedCredential | null,
  state: RequestState,
  verdict: unknown,
): unknown {
  if (verdict === NEEDS_HASHING) {
    const token = (credential as PresentedCredential & { type: "bearer" | "api-key" }).token;
    return verifyOnce(deps, credential!, state, `bearer\0${token}`, () => reserveTokenFailure(limits, state));
  }
  return spendFailure(limits, state, verdict, deps.wider);
}

/**
 * What `authenticator.authenticate` decides, as admission takes it: undefined once
 * `state.principal` is set, else the refusal. A verifier's synchronous throw and its
 * rejection are the same refusal. Never throws or rejects; synchronous when the verifiers were.
 */
function verdictOf(
  authenticator: Authenticator,
  credential: PresentedCredential | null,
  state: RequestState,
): unknown {
  let principal: Awaitable<Principal | null>;
  try {
    principal = authenticator.authenticate(credential, state);
  } catch (err) {
    return err;
  }
  if (principal instanceof Promise)
    return principal.then((p: Principal | null) => principalSet(state, p), refusalOf);
  return principalSet(state, principal);
}

/** Undefined once `principal` is the caller's; AUTH_REQUIRED when nothing authenticated it. */
function principalSet(state: RequestState, principal: Principal | null): unknown {
  if (!principal) return new TesseraError("AUTH_REQUIRED", "Authentication required");
  state.principal = principal;
  return undefined;
}

/** A rejection's error, returned as the refusal it is. */
function refusalOf(err: unknown): unknown {
  return err;
}

/** The shape of a JWT: verifying one costs a signature check, never PBKDF2. */
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/** Whether a refusal is a credential that did not verify (sending none, AUTH_REQUIRED, is not). */
function isFailure(refusal: unknown): boolean {
  return (
    refusal instanceof TesseraError &&
    refusal.code === Code.Unauthenticated &&
    refusal.reason !== "AUTH_REQUIRED"
  );
}

/**
 * A credential that did not verify spends a point of the IP's budget; once it is spent the
 * answer is RATE_LIMITED, so that a guesser learns nothing more from its guesses. Anything
 * else is returned as it is, synchronously; a spent failure is a promise that never rejects.
 */
export function spendFailure(
  limits: RateLimits,
  state: RequestState,
  refusal: unknown,
  wider?: FailureBudget,
): unknown {
  if (!isFailure(refusal)) return refusal;
  return spend(limits, state, refusal, wider);
}

async function spend(
  limits: RateLimits,
  state: RequestState,
  refusal: unknown,
  wider: FailureBudget | undefined,
): Promise<unknown> {
  try {
    const spent = await limits.authFailures.consume(budgetKey(state.ip));
    if (!spent.allowed) return authFailuresError(spent);
    if (wider === undefined) return refusal;
    const widely = await wider.limiter.consume(wider.key);
    return widely.allowed ? refusal : authFailuresError(widely);
  } catch (err) {
    // The budget's store failing (Redis gone) is what the call is answered with.
    return err;
  }
}

/**
 * HTTP Basic. A password the verified-secret cache already knows for the stored hash is
 * not a guess: it is checked first, with hashing refused (`RequestState.hashingRefused`), and
 * accepted with no reservation and no PBKDF2. Otherwise one failure of the IP's, the
 * username's and the username-at-this-IP's budgets is reserved before the password is
 * verified, and refunded when it verifies (or when no verdict was reached, e.g. the hash
 * pool was full). Concurrent identical credentials share that one reservation and
 * verification ({@link flights}): a client sending its correct password on 30
 * connections at once spends neither 30 reservations nor 30 PBKDF2 runs.
 */
function passwordIdentity(credential: PresentedCredential & { type: "basic" }): string {
  return `basic\0${credential.username}\0${credential.password}`;
}

/**
 * An opaque token that needs PBKDF2 (not verified before): one point of the IP's failure
 * budget is reserved first, kept when the token is refused and given back when it
 * verifies; concurrent first uses of one token share the reservation and the PBKDF2.
 */
async function reserveTokenFailure(limits: RateLimits, state: RequestState): Promise<PasswordAttempt> {
  const key = budgetKey(state.ip);
  const taken = await limits.authFailures.consume(key);
  if (!taken.allowed) throw authFailuresError(taken);
  const refund = () => limits.authFailures.refund(key, taken);
  let settled = false;
  const once = (fn: () => Promise<unknown>) => async () => {
    if (settled) return;
    settled = true;
    await fn();
  };
  return { succeeded: once(refund), failed: once(async () => {}), cancelled: once(refund) };
}

/**
 * `reserve`, then one point of `wider` (when set): a reservation refused by the wider budget
 * gives the first one back (no PBKDF2 will run for it); a success or no verdict gives both
 * back, a failure keeps both.
 */
function withinWider(
  wider: FailureBudget | undefined,
  reserve: () => Promise<PasswordAttempt>,
): () => Promise<PasswordAttempt> {
  if (wider === undefined) return reserve;
  return async () => {
    const first = await reserve();
    let taken: LimitResult;
    try {
      taken = await wider.limiter.consume(wider.key);
    } catch (err) {
      await first.cancelled();
      throw err;
    }
    if (!taken.allowed) {
      await first.cancelled();
      throw authFailuresError(taken);
    }
    const refund = () => wider.limiter.refund(wider.key, taken);
    return {
      succeeded: async () => {
        await Promise.all([first.succeeded(), refund()]);
      },
      failed: first.failed,
      cancelled: async () => {
        await Promise.all([first.cancelled(), refund()]);
      },
    };
  };
}

/**
 * Verify a credential that needs PBKDF2, its budget reserved by `reserve` (and within the
 * wider budget, {@link withinWider}) first; concurrent
 * identical credentials (by `identity`) from one address share one reservation and verification: the first
 * reserves and hashes, the others await its verdict (and, when it verified, find the
 * secret in the cache).
 */
async function verifyOnce(
  deps: AuthenticationDeps,
  credential: PresentedCredential,
  state: RequestState,
  identity: string,
  reserve: () => Promise<PasswordAttempt>,
): Promise<unknown> {
  // Per address too: a verdict (RATE_LIMITED, say) is about the budgets of the leader's address.
  const flightKey = hash("sha256", `${FLIGHT_KEY}\0${budgetKey(state.ip)}\0${identity}`, "base64");
  // Twice at most: after a flight that verified the secret, the cache knows it.
  for (let round = 0; ; round++) {
    const known = await knownCredential(deps, credential, state);
    if (known !== NEEDS_HASHING) return known;
    const flight = flights.get(flightKey);
    if (flight === undefined || round > 0) break;
    const verdict = await flight;
    if (verdict !== undefined) return verdict;
  }
  let settle!: (verdict: unknown) => void;
  const flight = new Promise<unknown>((resolve) => {
    settle = resolve;
  });
  flights.set(flightKey, flight);
  let verdict: unknown;
  try {
    verdict = await verifyReserved(deps, credential, state, withinWider(deps.wider, reserve));
  } catch (err) {
    verdict = err;
  } finally {
    flights.delete(flightKey);
  }
  settle(verdict);
  return verdict;
}

/** Refusal of hashing within {@link knownCredential}: compared by identity, never answered. */
const NEEDS_HASHING = new TesseraError("UNAVAILABLE", "needs hashing");

/** Key of {@link flights}: a per-process secret, so no credential's digest can be computed outside. */
const FLIGHT_KEY = randomBytes(32).toString("base64");

/**
 * Verifications that need PBKDF2 in flight, by keyed digest of the credential: what each
 * one's followers get (undefined when it verified: they find the secret in the cache).
 */
const flights = new Map<string, Promise<unknown>>();

/**
 * A credential decided without PBKDF2: undefined once `state.principal` is set, a refusal
 * (e.g. a known secret of a principal that may not act, an unknown token id), or
 * {@link NEEDS_HASHING}. Synchronous when the verifiers decided without I/O (a token
 * verified before whose row the state cache keeps); never throws or rejects.
 */
function knownCredential(
  deps: AuthenticationDeps,
  credential: PresentedCredential,
  state: RequestState,
): unknown {
  // On the request rather than in an async-local scope: a credential decided now enters no
  // scope (whose promise hooks would cost every concurrent request while one is in flight).
  state.hashingRefused = NEEDS_HASHING;
  const verdict = verdictOf(deps.authenticator, credential, state);
  if (verdict instanceof Promise) return verdict.then((v: unknown) => hashingAllowed(state, v));
  return hashingAllowed(state, verdict);
}

/** `verdict`, once hashing is allowed again for the request. */
function hashingAllowed(state: RequestState, verdict: unknown): unknown {
  state.hashingRefused = undefined;
  return verdict;
}

/**
 * A credential verified with PBKDF2, its budget reserved first. While the hash pool has no
 * room the check is refused before anything is reserved, as Login is (admission/shedding.ts):
 * a flood of Basic guesses then costs the limiters' store nothing (a reservation made
 * only to be refunded at once was two round trips per guess, three budgets each); an
 * address this instance knows has spent its budget gets its 429 rather than the pool's 503.
 */
async function verifyReserved(
  deps: AuthenticationDeps,
  credential: PresentedCredential,
  state: RequestState,
  reserve: () => Promise<PasswordAttempt>,
): Promise<unknown> {
  const pool = hashPool();
  if (!pool.hasRoom()) {
    const limited = deps.limits && spentAddressRefusal(deps.limits, state.ip);
    if (limited) return limited;
    const wider = deps.wider;
    const widely = wider?.limiter.spentNow(wider.key);
    if (widely) {
      wider!.limiter.refused++;
      return authFailuresError(widely);
    }
    try {
      // Throws the pool's own refusal (Unavailable, Retry-After), counted as refused.
      pool.assertRoom();
    } catch (busy) {
      return busy;
    }
  }
  let attempt: PasswordAttempt;
  try {
    attempt = await reserve();
  } catch (err) {
    return err;
  }
  try {
    const principal = await deps.authenticator.authenticate(credential, state);
    if (principal) {
      state.principal = principal;
      await attempt.succeeded();
      return undefined;
    }
    await attempt.cancelled();
    return new TesseraError("AUTH_REQUIRED", "Authentication required");
  } catch (err) {
    await (isFailure(err) ? attempt.failed() : attempt.cancelled());
    return err;
  }
}
