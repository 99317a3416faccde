import type { DescMethod } from "@bufbuild/protobuf";
import { Code, type ConnectError, type Interceptor } from "@connectrpc/connect";
import type { AuthRule } from "../../gen/tessera/v1/options_pb.js";
import type { App } from "../app.js";
import type { AuditLog } from "../audit.js";
import type { Authenticator } from "../auth/authenticator.js";
import { type HeaderSource, type PresentedCredential, parseCredentials } from "../auth/credentials.js";
import { budgetKey } from "../client-ip.js";
import { type RequestState, requestState } from "../context.js";
import { isRefusal, reasonForCode, TesseraError, tesseraErrorInfo } from "../errors.js";
import { toWireError } from "../interceptors/errors.js";
import {
  type Limiter,
  type LimitResult,
  type RateLimits,
  rateLimitedError,
  rateLimitHeaders,
} from "../rate-limit.js";
import { nodeHeaderSource, stateOf } from "../server/request-facts.js";
import type { WireError } from "../transport/early-answers.js";
import { refusalOnTheWire } from "../transport/error-wire.js";
import type { TransportOptions } from "../transport/index.js";
import { auditCall, auditReason } from "./audit.js";
import { authRuleFor, ruleRefusal } from "./auth-rule.js";
import { authenticationRefusal, spendFailure } from "./authenticate.js";

/**
 * Admission: whether a call may enter its RPC at all. In order: the per-IP rate limit
 * (every method), then, for methods that are not public, authentication (with the IP's
 * failed-authentication budget, see authenticate.ts), the method's auth rule (principal
 * kind, scopes) and the per-principal rate limit; a refusal of a call whose rule says
 * `audit` is written to the audit log here (a refusal by the per-IP limit is not).
 *
 * {@link admit} is the one implementation. The transport calls it before the request's
 * body is read (its `admit` hook, {@link createAdmissionHooks}: password shedding first),
 * so a refused caller costs no body parsing; the
 * {@link createAdmissionInterceptor admission interceptor} calls it for every other call
 * (in-memory transports, streams) and finishes what the HTTP layer left: the
 * authentication of an audited call, whose refusal is recorded with the call's target
 * (the request's `id`), known only once the body is read. `RequestState.admission` says
 * how far admission got, so that no check runs twice; it never holds a verdict. A call
 * whose body fails before that (it does not parse…) is admitted by {@link admitFailedCall}:
 * a caller learns nothing from its body before it is authenticated.
 */
export interface AdmissionDeps {
  authenticator: Authenticator;
  /** When set: the per-IP and per-principal limits, failed authentications counted per IP, and password checks' budgets reserved before PBKDF2 (rate-limit.ts). */
  limits?: RateLimits | undefined;
  audit: AuditLog;
}

/** The `message` of a call {@link admit} sees before its body is read (the HTTP layer's early admission). */
export const BEFORE_BODY: unique symbol = Symbol("before the body");

/**
 * Run the admission checks of a call to `method` that have not run yet (see
 * `RequestState.admission`). Sets `state.principal` once authenticated.
 *
 * `message`: the request (undefined for a stream), or {@link BEFORE_BODY} when the body is
 * not read yet; an audited method's authentication then waits for it (it is not run, and
 * undefined is returned with `state.admission` at "counted").
 * @returns the refusal, or undefined to go on; synchronously when decided without I/O
 *   (rate limits off or counted in memory, a credential whose rows the state cache keeps:
 *   auth/awaitable.ts), else a promise that never rejects.
 */
export function admit(
  deps: AdmissionDeps,
  method: DescMethod,
  headers: HeaderSource,
  state: RequestState,
  message: unknown,
): unknown {
  let rule: AuthRule;
  try {
    rule = authRuleFor(method);
  } catch (err) {
    return err;
  }
  if (state.admission === undefined) {
    // Refused by the per-IP limit: never audited (a flood must not become a flood of writes).
    const refusal = deps.limits === undefined ? undefined : countIp(deps.limits, state);
    if (refusal instanceof Promise)
      return refusal.then((r: unknown) => {
        if (r !== undefined) return r;
        state.admission = "counted";
        return afterCount(deps, method, rule, headers, state, message);
      });
    if (refusal !== undefined) return refusal;
    state.admission = "counted";
  }
  return afterCount(deps, method, rule, headers, state, message);
}

/**
 * The per-IP limit ({@link count}): synchronous when the limit's store is memory (the
 * default: `Limiter.consumeNow`), so that a call decided without I/O costs no promise.
 */
function countIp(limits: RateLimits, state: RequestState): unknown {
  try {
    return count(limits.perIp, budgetKey(state.ip), state);
  } catch (err) {
    return err;
  }
}

/** Authentication and authorization, once the per-IP limit has counted the call. */
function afterCount(
  deps: AdmissionDeps,
  method: DescMethod,
  rule: AuthRule,
  headers: HeaderSource,
  state: RequestState,
  message: unknown,
): unknown {
  if (rule.public) {
    state.admission = "admitted";
    return undefined;
  }
  // An audited call's refusal is recorded with its target: left for when the body is read.
  if (rule.audit && message === BEFORE_BODY) return undefined;
  const refusal = authenticateAndAuthorize(deps, rule, headers, state);
  if (refusal instanceof Promise)
    return refusal.then((r: unknown) => settled(deps, method, rule, state, message, r));
  return settled(deps, method, rule, state, message, refusal);
}

/** Record how far admission got, and audit the refusal of an audited call. */
function settled(
  deps: AdmissionDeps,
  method: DescMethod,
  rule: AuthRule,
  state: RequestState,
  message: unknown,
  refusal: unknown,
): unknown {
  if (refusal === undefined) {
    state.admission = "admitted";
    return undefined;
  }
  state.admission = "refused";
  if (rule.audit) auditCall(deps.audit, state, method, message, "failure", auditReason(refusal));
  return refusal;
}

/**
 * Authenticate (authenticate.ts), then authorize. Synchronous when authentication decided
 * without I/O (a credential the caches know: the common accepted call with a token seen
 * before), so that such a call costs no promise and no microtask turn until a rate limit
 * is counted.
 * @returns the refusal or undefined, or a promise of either that never rejects
 */
function authenticateAndAuthorize(
  deps: AdmissionDeps,
  rule: AuthRule,
  headers: HeaderSource,
  state: RequestState,
): unknown {
  const { limits } = deps;
  let credential: PresentedCredential | null;
  try {
    credential = parseCredentials(headers);
  } catch (err) {
    return limits ? spendFailure(limits, state, err) : err;
  }
  const refusal = authenticationRefusal(deps, credential, state);
  if (refusal instanceof Promise)
    return refusal.then((r: unknown) => (r === undefined ? authorize(rule, state, limits) : r));
  return refusal === undefined ? authorize(rule, state, limits) : refusal;
}

/**
 * Authorize the authenticated caller for a method with `rule`: its kind must be one the
 * rule admits and its scopes must cover every scope the rule requires; then the
 * per-principal rate limit counts the call.
 * @returns the refusal (PRINCIPAL_NOT_ALLOWED, ACCESS_DENIED, RATE_LIMITED) or undefined,
 *   or a promise of either when the per-principal limit is counted in Redis
 */
function authorize(rule: AuthRule, state: RequestState, limits: RateLimits | undefined): unknown {
  const principal = state.principal!;
  const refusal = ruleRefusal(rule, principal);
  if (refusal !== undefined) return refusal;
  return limits === undefined
    ? undefined
    : count(limits.perPrincipal, `${principal.kind}:${principal.id}`, state);
}

/**
 * Count the call on one of the two limits (per IP, per principal): its refusal
 * (RATE_LIMITED, or its store's failure), else undefined with the tighter of the limits'
 * headers kept for the answer. Synchronous when the limit's store is memory, else a
 * promise that never rejects.
 */
function count(limiter: Limiter, key: string, state: RequestState): unknown {
  let now: LimitResult | undefined;
  try {
    now = limiter.consumeNow(key);
  } catch (err) {
    return err;
  }
  if (now !== undefined) return limitCounted(state, now);
  return limiter.consume(key).then((result) => limitCounted(state, result), refusalOf);
}

function limitCounted(state: RequestState, result: LimitResult): unknown {
  if (!result.allowed) return rateLimitedError(result);
  const current = state.rateLimit;
  // The tighter limit: fewer remaining than the other's header says (which is never below 0).
  if (current === undefined || Math.max(0, current.remaining) > result.remaining) state.rateLimit = result;
  return undefined;
}

/** A rejection's error, returned as the refusal it is (admission returns refusals, never throws them). */
function refusalOf(err: unknown): unknown {
  return err;
}

/**
 * A call that failed before its pipeline ran, with `error`: its body could not be read,
 * decompressed or parsed, broke a limit, or its protocol headers were refused (Connect
 * raises these before any interceptor). Admission finishes first what it left for the
 * pipeline, so that a caller learns nothing from its body before it is authenticated:
 * the authentication of an audited call (whose refusal is then audited, without a target:
 * the body named none), or all of it on a path admitted only in the pipeline (streams,
 * gRPC-Web text). Every transport's unary calls come here (the `callError` of
 * {@link createAdmissionHooks}).
 *
 * @returns admission's refusal, to answer with instead of `error`; else `error`, after an
 *   audited call's failure was recorded (with reason `reasonForCode` of its code, as the
 *   access log names it); a promise of either when admission awaits (it never rejects).
 *   A fault of ours (Internal…) or a client gone (Canceled) is returned as it is.
 */
export function admitFailedCall(
  deps: AdmissionDeps,
  method: DescMethod,
  headers: HeaderSource,
  state: RequestState,
  error: ConnectError,
): unknown {
  if (!isRefusal(error.code) || error.code === Code.Canceled || error.code === Code.Aborted) return error;
  let rule: AuthRule;
  try {
    rule = authRuleFor(method);
  } catch (err) {
    return err;
  }
  const refusal =
    state.admission === "admitted" || state.admission === "refused"
      ? undefined
      : admit(deps, method, headers, state, undefined);
  const decided = (r: unknown): unknown => {
    // A refusal: recorded by admission (settled) when the rule says audit.
    if (r !== undefined) return r;
    if (rule.audit) auditCall(deps.audit, state, method, undefined, "failure", reasonForCode(error.code));
    return error;
  };
  return refusal instanceof Promise ? refusal.then(decided) : decided(refusal);
}

/**
 * The transport's two admission hooks, the glue between a call on the wire and the one
 * admission path (src/admission/): `admit`, asked before a call's body is read, and
 * `callError`, for a call Connect failed itself before the interceptors ran.
 */
export function createAdmissionHooks(
  app: App,
  admission: AdmissionDeps,
): Required<Pick<TransportOptions, "callError" | "admit">> {
  /** Admission's refusal of a call, answered before the pipeline. */
  function earlyRefusal(refusal: unknown, state: RequestState, method: DescMethod): ConnectError | WireError {
    // A refusal (not a fault, which is logged) in wire form, without a ConnectError (transport/error-wire.ts).
    if (refusal instanceof TesseraError && isRefusal(refusal.code)) {
      // As the error interceptor keeps it, for the access log and metrics (call-observer.ts).
      state.errorInfo = { reason: refusal.reason, requestId: state.requestId };
      return refusalOnTheWire(refusal, state.requestId, state.rateLimit && rateLimitHeaders(state.rateLimit));
    }
    return toWireError(refusal, state, `${method.parent.typeName}/${method.name}`, app.logger);
  }

  return {
    // An error Connect raised itself (no ErrorInfo: a body that does not parse, too large, an
    // unsupported encoding…, before the interceptors): admission first finishes what it left
    // for the pipeline (admitFailedCall), so its refusal is the answer and is audited; else
    // Connect's error, whatever its code, gets the reason and request id every other error
    // carries (reasonForCode), as a stream's do in the error interceptor.
    callError: (error, values, method, headers) => {
      if (tesseraErrorInfo(error) !== undefined) return error;
      const state = requestState(values);
      const name = `${method.parent.typeName}/${method.name}`;
      const answer = (decided: unknown): ConnectError => toWireError(decided, state, name, app.logger);
      const decided = admitFailedCall(admission, method, headers, state, error);
      return decided instanceof Promise ? decided.then(answer) : answer(decided);
    },
    // Asked only about calls that can be answered before their body; the others are admitted in
    // the pipeline (the admission interceptor), as is the authentication of an audited call
    // (admission/index.ts).
    admit: (req, method) => {
      const state = stateOf(req);
      // A password check the full hash pool would refuse anyway: answered now, body unread.
      const shed = app.shedding.shed(method, state);
      if (shed !== undefined) return shed;
      const refusal = admit(admission, method, nodeHeaderSource(req.headers), state, BEFORE_BODY);
      // Decided synchronously (or nothing to decide): no promise.
      if (refusal === undefined) return undefined;
      if (refusal instanceof Promise)
        return refusal.then((r: unknown) => (r === undefined ? undefined : earlyRefusal(r, state, method)));
      return earlyRefusal(refusal, state, method);
    },
  };
}

/**
 * The one interceptor of admission, for every transport (connectNodeAdapter, the
 * in-memory router transport, and the calls the HTTP layer did not admit before their
 * body: see {@link admit}). A call already admitted passes straight on; otherwise
 * {@link admit} runs what is left, and a refusal is thrown.
 */
export function createAdmissionInterceptor(deps: AdmissionDeps): Interceptor {
  return (next) => (req) => {
    const state = requestState(req.contextValues);
    if (state.admission === "admitted") return next(req);
    const refusal = admit(deps, req.method, req.header, state, req.stream ? undefined : req.message);
    if (refusal === undefined) return next(req);
    if (refusal instanceof Promise)
      return refusal.then((r: unknown) => (r === undefined ? next(req) : Promise.reject(r)));
    return Promise.reject(refusal);
  };
}

export { assertAuthRules, authRuleFor, ruleRefusal } from "./auth-rule.js";
