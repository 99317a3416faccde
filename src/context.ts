import { randomUUID } from "node:crypto";
import { type ContextValues, createContextKey } from "@connectrpc/connect";
import type { PeerCertificateInfo, Principal } from "./auth/principal.js";

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
   * True when the direct peer is a trusted proxy: the connection (and any certificate on
   * it) is the proxy's, shared by every client behind it, so it proves nothing of theirs.
   */
  viaProxy?: boolean;
  /** Set by the authentication interceptor; null on public methods. */
  principal: Principal | null;
  /**
   * The authenticated user as the authentication path read it from its row for this very
   * request (JWT, Basic, personal access token, API key), so that a handler needing the
   * same row (GetCurrentUser) does not read it twice. `createdAt` in epoch ms.
   */
  user?: { id: string; username: string; tenantId: string; createdAt: number };
  /**
   * The reason and request id of the error the request ended with, as the error
   * interceptor put them in the ErrorInfo detail (lets the HTTP layer add the JSON error
   * envelope without parsing the body Connect wrote).
   */
  errorInfo?: { reason: string; requestId: string };
  /**
   * Set when the HTTP layer ran admission (admission.ts: per-IP limit, authentication,
   * authorization) before the RPC pipeline, so that the interceptors do not run them again.
   */
  admission?: Admission;
  /** Response headers to add (e.g. X-RateLimit-*), applied by the error interceptor. */
  responseHeaders?: Record<string, string>;
  /** `performance.now()` when the HTTP layer received the request (a call's duration, for metrics and the access log). */
  startedAt?: number;
}

/**
 * The outcome of admission. A refusal the HTTP layer did not answer itself (a call the
 * audit log records, or a protocol it does not write) is thrown in the pipeline where the
 * check it replaces would have thrown it: `limited` by the rate-limit interceptor, before
 * the audit, `refused` by the authentication interceptor, after it (authorization refusals too).
 */
export interface Admission {
  /** Refused by the per-IP rate limit. */
  limited?: unknown;
  /** Refused by authentication (credential, the IP's failed-authentication budget) or authorization (kind, scopes, per-principal limit). */
  refused?: unknown;
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
