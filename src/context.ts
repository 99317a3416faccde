import { randomUUID } from "node:crypto";
import { type ContextKey, type ContextValues, createContextKey } from "@connectrpc/connect";
import type { PeerCertificateInfo, Principal } from "./auth/principal.js";
import type { TesseraError } from "./errors.js";
import type { LimitResult } from "./rate-limit/limiter.js";

/**
 * Per-request state shared by the HTTP layer, the interceptors and the handlers through
 * one Connect context value (one allocation per request).
 */
export interface RequestState {
  requestId: string;
  /** Client IP (forwarding headers read only from a trusted proxy: see client-ip.ts). */
  ip: string;
  /** The connection's verified client certificate, or null. */
  certificate: PeerCertificateInfo | null;
  /**
   * With a certificate: whether it still authenticates now (not expired, not revoked by the
   * CRL loaded since, still chaining to the CA): a stream it authenticated asks as it runs.
   */
  certificateHolds?: () => boolean;
  /**
   * True when the direct peer is a trusted proxy: the connection (and any certificate on
   * it) is the proxy's, shared by every client behind it, so it proves nothing of theirs.
   */
  viaProxy?: boolean;
  /** Set by admission once authenticated (src/admission/); null on public methods. */
  principal: Principal | null;
  /**
   * The authenticated user as the authentication path read it from its row for this very
   * request (JWT, Basic, personal access token, API key), so that a handler needing the
   * same row (GetCurrentUser) does not read it twice. `createdAt` in epoch ms.
   */
  user?: { id: string; username: string; tenantId: string; createdAt: number };
  /**
   * HTTP Basic (a user's): whether the password this request authenticated with matches a
   * stored hash (a PBKDF2), so that what the call makes can tell a re-hash of that password
   * (auth/password-upgrade.ts), by a concurrent call on any instance, from a password change.
   */
  samePassword?: (stored: string) => Promise<boolean>;
  /**
   * The reason and request id of the error the request ended with, as the error
   * interceptor put them in the ErrorInfo detail (lets the HTTP layer add the JSON error
   * envelope without parsing the body Connect wrote).
   */
  errorInfo?: { reason: string; requestId: string };
  /**
   * How far admission (src/admission/) got with this call, so that no check runs twice
   * (the HTTP layer runs it before the body, the admission interceptor finishes it):
   * "counted" by the per-IP limit, "admitted", or "refused" (answered already). Never a
   * verdict to act on later. Undefined before the per-IP limit let the call through.
   */
  admission?: "counted" | "admitted" | "refused";
  /**
   * The call was refused by load shedding (admission/shedding.ts), which logs such calls in
   * aggregate: no access line of its own (call-observer.ts); still counted in the metrics.
   */
  aggregated?: true;
  /**
   * What an audited call acted on, named by its handler (admission/audit.ts, auditTarget):
   * the target's id where the request alone cannot say (a created object's id, the user a
   * Login or a refresh token resolved to: see AUDIT_TARGETS), and the tenant it is in, which
   * decides where the record is filed when the actor spans tenants or is anonymous.
   */
  audited?: { targetId?: string; tenantId: string | null };
  /**
   * The limit the answer describes in its X-RateLimit-* headers (the tighter of those the
   * request was counted on), kept as counted: the headers are made where the answer is
   * written (the error interceptor, the error wire form, the OAuth endpoints).
   */
  rateLimit?: LimitResult;
  /**
   * Only when verifying a credential for another service (src/verification/): the tenant
   * the verifying caller is confined to. A credential of another tenant is refused by its
   * verifier exactly as an unknown one (same refusal, same work: before its secret is
   * checked), so that the wall cannot be told from a missing credential, even by timing.
   */
  tenantWall?: string;
  /**
   * Set by admission while it tries a credential with no PBKDF2 allowed (its first,
   * budget-free attempt: admission/authenticate.ts): a verifier that would need a hash gets
   * this refusal instead (VerifiedSecretCache.verify, dummyPasswordHash). Carried here
   * rather than in an async-local scope, so that a credential decided synchronously enters
   * no scope at all.
   */
  hashingRefused?: TesseraError;
  /** `performance.now()` when the HTTP layer received the request (a call's duration, for metrics and the access log). */
  startedAt?: number;
}

/** Context key of {@link RequestState}; the default (in-memory transports) is filled lazily. */
export const requestStateKey = createContextKey<RequestState | undefined>(undefined, {
  description: "tessera request state",
});

/** The request state, created on first use where no HTTP layer made one (in-memory transports). */
export function requestState(values: ContextValues): RequestState {
  let state = values.get(requestStateKey);
  if (!state) {
    state = { requestId: randomUUID(), ip: "in-process", certificate: null, principal: null };
    values.set(requestStateKey, state);
  }
  return state;
}

/**
 * Connect's `createContextValues()` with its methods on a prototype: Connect's makes an
 * object literal with three fresh functions for every call. Values are held as Connect
 * holds them (under the key's symbol, on the object itself), so they behave the same.
 */
export class CallValues implements ContextValues {
  get<T>(key: ContextKey<T>): T {
    const own = this as unknown as Record<symbol, T>;
    return key.id in this ? own[key.id]! : key.defaultValue;
  }

  set<T>(key: ContextKey<T>, value: T): this {
    (this as unknown as Record<symbol, T>)[key.id] = value;
    return this;
  }

  delete(key: ContextKey<unknown>): this {
    delete (this as unknown as Record<symbol, unknown>)[key.id];
    return this;
  }
}
