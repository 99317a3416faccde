import { hash, randomBytes } from "node:crypto";
import { Code } from "@connectrpc/connect";
import type { Authenticator } from "../auth/authenticator.js";
import type { PresentedCredential } from "../auth/credentials.js";
import { hashPool, withoutHashing } from "../auth/hash-pool.js";
import { budgetKey } from "../client-ip.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import {
  authFailuresError,
  type PasswordAttempt,
  type RateLimits,
  spentAddressRefusal,
} from "../rate-limit.js";

/** What authentication needs: the verifiers, and the budgets when rate limits are on. */
export interface AuthenticationDeps {
  authenticator: Authenticator;
  /** When set: failed authentications counted per IP, and password checks' budgets reserved before PBKDF2 (rate-limit.ts). */
  limits?: RateLimits | undefined;
}

/**
 * Authenticate `credential` (null: none sent, the connection's bound certificate may
 * stand for it) when the synchronous attempt of admission (index.ts) could not decide it:
 * `from` is the first bearer verifier still to ask. Sets `state.principal`.
 *
 * The refusal is returned rather than thrown. Why: refusing is what a public API does most
 * under attack, and a throw that crosses async frames is costly in V8 (each frame rejects
 * its promise, and a throw looks up the stack for a handler).
 * @returns undefined once `state.principal` is set; otherwise the refusal (AUTH_REQUIRED,
 *   a credential refusal, or RATE_LIMITED once the IP's failed-authentication budget is spent)
 */
export async function authenticationRefusal(
  deps: AuthenticationDeps,
  credential: PresentedCredential | null,
  state: RequestState,
  from: number,
): Promise<unknown> {
  const { authenticator, limits } = deps;
  // A password: budget reserved before PBKDF2 (rate-limit.ts, PasswordGuard).
  if (limits && credential?.type === "basic") return basicRefusal(deps, limits, credential, state);
  let refusal: unknown;
  // An opaque token is first verified with hashing refused: one verified before (or one that
  // needs no PBKDF2 to refuse) is decided so, whatever its IP spent. One that needs PBKDF2
  // reserves a point of the IP's failure budget first (tokenRefusal). A JWT (or a
  // certificate) never needs PBKDF2, so a valid one is accepted whatever its IP spent: one
  // guesser behind a NAT does not lock out everyone behind it.
  try {
    if (limits && credential?.type === "bearer" && !JWT_SHAPE.test(credential.token)) {
      const known = await knownCredential(deps, credential, state, from);
      if (known === NEEDS_HASHING) return tokenRefusal(deps, limits, credential, state);
      if (known === undefined) return undefined;
      refusal = known;
    } else {
      const principal = await authenticator.authenticate(credential, state, from);
      if (principal) {
        state.principal = principal;
        return undefined;
      }
      refusal = new TesseraError("AUTH_REQUIRED", "Authentication required");
    }
  } catch (err) {
    refusal = err;
  }
  return limits ? spendFailure(limits, state, refusal) : refusal;
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
 * answer is RATE_LIMITED, so that a guesser learns nothing more from its guesses. Never rejects.
 */
export async function spendFailure(
  limits: RateLimits,
  state: RequestState,
  refusal: unknown,
): Promise<unknown> {
  if (!isFailure(refusal)) return refusal;
  try {
    const spent = await limits.authFailures.consume(budgetKey(state.ip));
    return spent.allowed ? refusal : authFailuresError(spent);
  } catch (err) {
    // The budget's store failing (Redis gone) is what the call is answered with.
    return err;
  }
}

/**
 * HTTP Basic. A password the verified-secret cache already knows for the stored hash is
 * not a guess: it is checked first, with hashing refused ({@link withoutHashing}), and
 * accepted with no reservation and no PBKDF2. Otherwise one failure of the IP's, the
 * username's and the username-at-this-IP's budgets is reserved before the password is
 * verified, and refunded when it verifies (or when no verdict was reached, e.g. the hash
 * pool was full). Concurrent identical credentials share that one reservation and
 * verification ({@link flights}): a client sending its correct password on 30
 * connections at once spends neither 30 reservations nor 30 PBKDF2 runs.
 */
function basicRefusal(
  deps: AuthenticationDeps,
  limits: RateLimits,
  credential: PresentedCredential & { type: "basic" },
  state: RequestState,
): Promise<unknown> {
  return verifyOnce(deps, credential, state, `basic\0${credential.username}\0${credential.password}`, () =>
    limits.passwords.reserve(state.ip, credential.username),
  );
}

/**
 * An opaque token that needs PBKDF2 (not verified before): one point of the IP's failure
 * budget is reserved first, kept when the token is refused and given back when it
 * verifies; concurrent first uses of one token share the reservation and the PBKDF2.
 */
function tokenRefusal(
  deps: AuthenticationDeps,
  limits: RateLimits,
  credential: PresentedCredential & { type: "bearer" },
  state: RequestState,
): Promise<unknown> {
  return verifyOnce(deps, credential, state, `bearer\0${credential.token}`, async () => {
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
  });
}

/**
 * Verify a credential that needs PBKDF2, its budget reserved by `reserve` first; concurrent
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
    verdict = await verifyReserved(deps, credential, state, reserve);
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
 * {@link NEEDS_HASHING}.
 */
async function knownCredential(
  deps: AuthenticationDeps,
  credential: PresentedCredential,
  state: RequestState,
  from?: number,
): Promise<unknown> {
  try {
    // A token verified before, decided without awaiting, needs no async-context scope
    // (whose promise hooks cost every concurrent request while one is in flight). `from`:
    // the caller asked the synchronous path already, which stopped at that verifier.
    if (from === undefined) {
      from = 0;
      if (credential.type === "bearer") {
        const now = deps.authenticator.authenticateNow(credential, state);
        if (typeof now !== "number") {
          state.principal = now;
          return undefined;
        }
        from = now;
      }
    }
    const principal = await withoutHashing(NEEDS_HASHING, () =>
      deps.authenticator.authenticate(credential, state, from),
    );
    if (!principal) return new TesseraError("AUTH_REQUIRED", "Authentication required");
    state.principal = principal;
    return undefined;
  } catch (err) {
    return err;
  }
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
