import { TesseraError, wwwAuthenticate } from "../errors.js";
import { driverErrorAsTesseraError } from "../storage/errors.js";

// The OAuth 2.0 endpoints' error model: the RFC 6749 §5.2 answer, and how Tessera's
// refusals and faults map onto it.

/** How the client authenticated (RFC 7591 names; "bearer" for a bearer credential where allowed). */
export type ClientAuthMethod = "client_secret_basic" | "client_secret_post" | "tls_client_auth" | "bearer";

/** The challenge of a refused client_secret_basic (or of any client authentication but a bearer). */
export const BASIC_CHALLENGE = { "www-authenticate": 'Basic realm="tessera"' };

/**
 * The RFC 6749 / 7009 error codes the endpoints answer with (and, for faults, RFC 6749
 * §4.1.2.1's; for a client whose rule refuses it, RFC 6750 §3.1's `insufficient_scope`).
 */
export type OAuthErrorCode =
  | "invalid_request"
  | "invalid_client"
  | "invalid_grant"
  | "invalid_scope"
  | "unauthorized_client"
  | "unsupported_grant_type"
  | "unsupported_token_type"
  | "insufficient_scope"
  | "temporarily_unavailable"
  | "server_error";

/** An OAuth error answer: `{ error, error_description }` with its HTTP status and headers. */
export class OAuthError extends Error {
  override readonly name = "OAuthError";
  constructor(
    readonly error: OAuthErrorCode,
    readonly description: string,
    readonly status = 400,
    readonly headers: Record<string, string> = {},
  ) {
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    super(description);
    Error.stackTraceLimit = limit;
  }

  /** The JSON body (RFC 6749 §5.2). */
  body(): { error: OAuthErrorCode; error_description: string } {
    return { error: this.error, error_description: this.description };
  }
}

/**
 * The OAuth answer for an error raised while handling a request: Tessera's refusals mapped
 * by the stage that raised them (client authentication: invalid_client; a grant:
 * invalid_grant; a scope check: invalid_scope), rate limits 429 and faults (the database
 * or Redis away) 503 with Retry-After as `temporarily_unavailable`, anything else 500
 * `server_error` (logged by the caller, never described). Messages carry no credential.
 */
export function asOAuthError(
  err: unknown,
  stage: "client" | "grant" | "scope",
  method?: ClientAuthMethod,
): OAuthError {
  if (err instanceof OAuthError) return err;
  return withCause(mapError(err, stage, method), err);
}

/**
 * `err` with the Tessera error it stands for as its `cause`: kept for the audit record's and
 * the access line's reason, never sent.
 */
export function withCause(err: OAuthError, cause: unknown): OAuthError {
  Object.defineProperty(err, "cause", { value: cause });
  return err;
}

function mapError(err: unknown, stage: "client" | "grant" | "scope", method?: ClientAuthMethod): OAuthError {
  const e = driverErrorAsTesseraError(err) ?? err;
  if (!(e instanceof TesseraError)) return new OAuthError("server_error", "internal error", 500);
  switch (e.reason) {
    case "RATE_LIMITED":
      return new OAuthError("temporarily_unavailable", e.message, 429, e.headers);
    case "UNAVAILABLE":
      return new OAuthError("temporarily_unavailable", e.message, 503, {
        "retry-after": "1",
        ...e.headers,
      });
    case "INTERNAL":
      return new OAuthError("server_error", "internal error", 500);
    case "MULTIPLE_CREDENTIALS":
      return new OAuthError("invalid_request", e.message);
    default:
      break;
  }
  if (stage === "client") {
    if (e.reason === "INVALID_ARGUMENT") return new OAuthError("invalid_request", e.message);
    if (e.reason === "PRINCIPAL_NOT_ALLOWED" || e.reason === "ACCESS_DENIED")
      return new OAuthError("unauthorized_client", e.message);
    const challenge =
      method === "bearer" ? { "www-authenticate": wwwAuthenticate(e.reason, e.message) } : BASIC_CHALLENGE;
    return new OAuthError("invalid_client", e.message, 401, challenge);
  }
  if (stage === "scope" && (e.reason === "ACCESS_DENIED" || e.reason === "INVALID_ARGUMENT"))
    return new OAuthError("invalid_scope", e.message);
  if (e.reason === "INVALID_ARGUMENT") return new OAuthError("invalid_request", e.message);
  return new OAuthError("invalid_grant", e.message);
}
