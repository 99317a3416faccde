import { hash, randomBytes } from "node:crypto";
import { Code } from "@connectrpc/connect";
import type { AuthRule } from "../gen/tessera/v1/options_pb.js";
import type { Authenticator } from "./auth/authenticator.js";
import { type HeaderSource, type PresentedCredential, parseCredentials } from "./auth/credentials.js";
import { withoutHashing } from "./auth/hash-pool.js";
import { admits, type Principal } from "./auth/principal.js";
import { hasAllScopes } from "./auth/scopes.js";
import { budgetKey } from "./client-ip.js";
import type { Admission, RequestState } from "./context.js";
import { TesseraError, wwwAuthenticate } from "./errors.js";
import {
  authFailuresError,
  type PasswordAttempt,
  type RateLimits,
  rateLimitedError,
  rateLimitHeaders,
} from "./rate-limit.js";

/**
 * Admission: the checks that decide whether a request may enter an RPC at all, before its
 * body matters. In order: the per-IP rate limit (every method), then, for methods that are
 * not public, the failed-authentication budget of the IP and the caller's credential, then
 * the method's auth rule (principal kind, scopes) and the per-principal rate limit.
 *
 * The HTTP layer runs them before Connect reads the request (see `admit` in server.ts), so
 * a refused caller costs no body parsing and no RPC pipeline, and an unauthenticated
 * request never has its body parsed at all. The rate-limit, authentication and authorization
 * interceptors run the same functions for transports without that layer (in-memory, tests), and skip
 * them when the HTTP layer already has (`RequestState.admission`).
 */
export interface AdmissionDeps {
  authenticator: Authenticator;
  /** When set: the per-IP limit, failed authentications counted per IP, and password checks' budgets reserved before PBKDF2 (rate-limit.ts). */
  limits?: RateLimits | undefined;
}

/** Count one request against the caller's IP. @throws TesseraError RATE_LIMITED */
export async function countRequest(limits: RateLimits, state: RequestState): Promise<void> {
  const result = await limits.perIp.consume(budgetKey(state.ip));
  if (!result.allowed) throw rateLimitedError(result);
  state.responseHeaders = rateLimitHeaders(result);
}

/**
 * Authenticate the caller of a method that is not public: a credential (or a bound client
 * certificate) must verify. Sets `state.principal`.
 * @throws TesseraError AUTH_REQUIRED, a credential refusal, or RATE_LIMITED once the IP's
 *   failed-authentication budget is spent
 */
export async function authenticateCaller(
  deps: AdmissionDeps,
  headers: HeaderSource,
  state: RequestState,
): Promise<void> {
  const refusal = await authenticationRefusal(deps, headers, state);
  if (refusal !== undefined) throw refusal;
}

/**
 * What {@link authenticateCaller} does, with the refusal returned rather than thrown.
 *
 * Why: refusing is what a public API does most under attack, and a throw that crosses
 * async frames is costly in V8 (each frame rejects its promise, and a throw looks up the
 * stack for a handler). A token already refused (a replayed forgery, see
 * `Authenticator.knownRefusal`) is refused here without any throw.
 * @returns undefined once `state.principal` is set; otherwise the refusal
 */
export async function authenticationRefusal(
  deps: AdmissionDeps,
  headers: HeaderSource,
  state: RequestState,
  parsed?: Parsed,
): Promise<unknown> {
  const { authenticator, limits } = deps;
  let credential: PresentedCredential | null;
  try {
    credential = parsed === undefined ? parseCredentials(headers) : parsed.credential;
  } catch (err) {
    return limits ? await spendFailure(limits, state, err) : err;
  }
  // A password: budget reserved before PBKDF2 (rate-limit.ts, PasswordGuard).
  if (limits && credential?.type === "basic") return basicRefusal(deps, limits, credential, state);
  let refusal: unknown;
  let from = parsed?.from ?? 0;
  try {
    refusal =
      credential === null || parsed !== undefined ? undefined : authenticator.knownRefusal(credential);
    // With limits on (admitNow did not run), a token verified before (a JWT, or an opaque
    // token whose secret the cache knows) whose state is read synchronously is decided here
    // without awaiting: no async frames, no regex over the token, no no-hashing scope.
    if (refusal === undefined && limits && parsed === undefined && credential?.type === "bearer") {
      const now = authenticator.authenticateNow(credential, state);
      if (typeof now !== "number") {
        state.principal = now;
        return undefined;
      }
      from = now;
    }
  } catch (err) {
    refusal = err;
  }
  // An opaque token is first verified with hashing refused: one verified before (or one that
  // needs no PBKDF2 to refuse) is decided so, whatever its IP spent. One that needs PBKDF2
  // reserves a point of the IP's failure budget first (tokenRefusal). A JWT (or a
  // certificate) never needs PBKDF2, so a valid one is accepted whatever its IP spent: one
  // guesser behind a NAT does not lock out everyone behind it.
  const opaque =
    refusal === undefined && limits && credential?.type === "bearer" && !JWT_SHAPE.test(credential.token)
      ? { limits, credential }
      : undefined;
  try {
    if (refusal === undefined && opaque) {
      const known = await knownCredential(deps, opaque.credential, state, from);
      if (known === NEEDS_HASHING) return tokenRefusal(deps, opaque.limits, opaque.credential, state);
      if (known === undefined) return undefined;
      refusal = known;
    } else if (refusal === undefined) {
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
  return limits ? await spendFailure(limits, state, refusal) : refusal;
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
 * answer is RATE_LIMITED, so that a guesser learns nothing more from its guesses.
 */
async function spendFailure(limits: RateLimits, state: RequestState, refusal: unknown): Promise<unknown> {
  if (!isFailure(refusal)) return refusal;
  const spent = await limits.authFailures.consume(budgetKey(state.ip));
  return spent.allowed ? refusal : authFailuresError(spent);
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
  deps: AdmissionDeps,
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
  deps: AdmissionDeps,
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
  deps: AdmissionDeps,
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
  deps: AdmissionDeps,
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

/** A credential verified with PBKDF2, its budget reserved first. */
async function verifyReserved(
  deps: AdmissionDeps,
  credential: PresentedCredential,
  state: RequestState,
  reserve: () => Promise<PasswordAttempt>,
): Promise<unknown> {
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

/**
 * Authorize the authenticated caller for a method with `rule`: its kind must be one the rule
 * admits and its scopes must cover every scope the rule requires; then the per-principal
 * rate limit counts the call.
 * @throws TesseraError AUTH_REQUIRED, PRINCIPAL_NOT_ALLOWED, ACCESS_DENIED, RATE_LIMITED
 */
export async function authorizeCaller(
  rule: AuthRule,
  state: RequestState,
  limits: RateLimits | undefined,
): Promise<void> {
  const principal = state.principal;
  if (!principal) throw new TesseraError("AUTH_REQUIRED", "Authentication required");
  const refusal = authorizationRefusal(rule, principal);
  if (refusal !== undefined) throw refusal;
  if (limits) {
    const result = await limits.perPrincipal.consume(`${principal.kind}:${principal.id}`);
    if (!result.allowed) throw rateLimitedError(result);
    // The tighter of the two limits is the one a client should pace itself by.
    const current = state.responseHeaders;
    if (!current || Number(current["x-ratelimit-remaining"]) > result.remaining)
      state.responseHeaders = rateLimitHeaders(result);
  }
}

/** Why `rule` does not admit `principal` (its kind, or a missing scope), or undefined when it does. */
function authorizationRefusal(rule: AuthRule, principal: Principal): TesseraError | undefined {
  if (!rule.principals.some((kind) => admits(kind, principal))) {
    return new TesseraError(
      "PRINCIPAL_NOT_ALLOWED",
      `this method is not available to ${principal.kind} principals`,
    );
  }
  if (!hasAllScopes(principal.scopes, rule.scopes)) {
    return new TesseraError("ACCESS_DENIED", "Insufficient permissions", {
      headers: { "www-authenticate": wwwAuthenticate("ACCESS_DENIED", "", rule.scopes) },
      metadata: { required_scopes: rule.scopes.join(" ") },
    });
  }
  return undefined;
}

/**
 * Run every admission check a request to a method with `rule` needs, in order, recording
 * the outcome in `state.admission`: `limited` for a refusal by the per-IP limit, `refused`
 * for one by authentication or authorization (the audit log records those for the calls it audits, so they
 * are thrown inside the pipeline, after the audit interceptor).
 * @returns undefined when the checks are done already (nothing to check, or decided
 *   synchronously: see {@link admitNow}), so that the caller needs no promise then;
 *   otherwise a promise that settles (never rejects) when they are done.
 */
export function admit(
  deps: AdmissionDeps,
  rule: AuthRule,
  headers: HeaderSource,
  state: RequestState,
): Promise<void> | undefined {
  const admission: Admission = {};
  state.admission = admission;
  if (rule.public && !deps.limits) return undefined;
  if (deps.limits === undefined) {
    const parsed = admitNow(deps, rule, headers, state, admission);
    if (parsed === DONE) return undefined;
    return admitAll(deps, rule, headers, state, admission, parsed);
  }
  return admitAll(deps, rule, headers, state, admission);
}

/** What {@link admitNow} returns once it has decided. */
const DONE = Symbol("admitted now");

/** What {@link admitNow} learnt before it had to stop: the credential (null: none), and the first bearer verifier still to ask. */
interface Parsed {
  credential: PresentedCredential | null;
  from: number;
}

/**
 * Authentication and authorization decided synchronously, when no rate limit is counted
 * and the authenticator can tell without I/O (`Authenticator.authenticateNow`: a token
 * verified before, its subject's row read synchronously). Records the outcome in
 * `admission` as {@link admitAll} would, and returns DONE; otherwise returns what it
 * learnt, for `admitAll` to go on from (the credential is not parsed, nor its known
 * refusal looked up, twice).
 */
function admitNow(
  deps: AdmissionDeps,
  rule: AuthRule,
  headers: HeaderSource,
  state: RequestState,
  admission: Admission,
): Parsed | typeof DONE {
  let credential: PresentedCredential | null;
  let principal: Principal | number;
  try {
    credential = parseCredentials(headers);
    if (credential === null) return { credential, from: 0 };
    const known = deps.authenticator.knownRefusal(credential);
    if (known !== undefined) {
      admission.refused = known;
      return DONE;
    }
    principal = deps.authenticator.authenticateNow(credential, state);
  } catch (err) {
    admission.refused = err;
    return DONE;
  }
  if (typeof principal === "number") return { credential, from: principal };
  state.principal = principal;
  const refusal = authorizationRefusal(rule, principal);
  if (refusal !== undefined) admission.refused = refusal;
  return DONE;
}

async function admitAll(
  deps: AdmissionDeps,
  rule: AuthRule,
  headers: HeaderSource,
  state: RequestState,
  admission: Admission,
  parsed?: Parsed,
): Promise<void> {
  if (deps.limits) {
    try {
      await countRequest(deps.limits, state);
    } catch (err) {
      admission.limited = err;
      return;
    }
  }
  if (rule.public) return;
  try {
    const refusal = await authenticationRefusal(deps, headers, state, parsed);
    if (refusal !== undefined) {
      admission.refused = refusal;
      return;
    }
    await authorizeCaller(rule, state, deps.limits);
  } catch (err) {
    admission.refused = err;
  }
}
