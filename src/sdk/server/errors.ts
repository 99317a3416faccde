import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "../../../gen/google/rpc/error_details_pb.js";

/** The `google.rpc.ErrorInfo` domain of Tessera's errors, downstream ones included. */
export const TESSERA_ERROR_DOMAIN = "tessera.dev";

/**
 * Stable reasons of a downstream refusal: the same words Tessera's own RPCs use, so a
 * client handles a refusal by Tessera and by a service Tessera protects alike.
 */
export type TesseraAuthReason =
  | "AUTH_REQUIRED"
  | "AUTH_HEADER_MALFORMED"
  | "TOKEN_INVALID"
  | "TOKEN_EXPIRED"
  | "TOKEN_REVOKED"
  | "TOKEN_NOT_BOUND"
  | "CREDENTIALS_INVALID"
  | "PRINCIPAL_DISABLED"
  | "ACCESS_DENIED"
  | "PRINCIPAL_NOT_ALLOWED"
  | "RATE_LIMITED"
  | "UNAVAILABLE"
  | "INTERNAL";

const CODES: Readonly<Record<TesseraAuthReason, Code>> = {
  AUTH_REQUIRED: Code.Unauthenticated,
  AUTH_HEADER_MALFORMED: Code.Unauthenticated,
  TOKEN_INVALID: Code.Unauthenticated,
  TOKEN_EXPIRED: Code.Unauthenticated,
  TOKEN_REVOKED: Code.Unauthenticated,
  TOKEN_NOT_BOUND: Code.Unauthenticated,
  CREDENTIALS_INVALID: Code.Unauthenticated,
  PRINCIPAL_DISABLED: Code.Unauthenticated,
  ACCESS_DENIED: Code.PermissionDenied,
  PRINCIPAL_NOT_ALLOWED: Code.PermissionDenied,
  RATE_LIMITED: Code.ResourceExhausted,
  UNAVAILABLE: Code.Unavailable,
  INTERNAL: Code.Internal,
};

const STATUS: Partial<Record<Code, number>> = {
  [Code.Unauthenticated]: 401,
  [Code.PermissionDenied]: 403,
  [Code.ResourceExhausted]: 429,
  [Code.Unavailable]: 503,
  [Code.Internal]: 500,
};

/**
 * Why the interceptor or the middleware refused a call. `message` is for humans and never
 * carries the credential; callers switch on `reason`.
 */
export class TesseraAuthError extends Error {
  override readonly name = "TesseraAuthError";
  readonly reason: TesseraAuthReason;
  /** Seconds to wait before trying again (RATE_LIMITED, UNAVAILABLE). */
  readonly retryAfterSeconds: number | undefined;
  /** The scopes the method needs (ACCESS_DENIED), for the WWW-Authenticate challenge. */
  readonly requiredScopes: readonly string[] | undefined;

  constructor(
    reason: TesseraAuthReason,
    message: string,
    extra: { retryAfterSeconds?: number; requiredScopes?: readonly string[]; cause?: unknown } = {},
  ) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.reason = reason;
    this.retryAfterSeconds = extra.retryAfterSeconds;
    this.requiredScopes = extra.requiredScopes;
  }

  /** The Connect code of the reason. */
  get code(): Code {
    return CODES[this.reason];
  }

  /** The HTTP status of the reason (401, 403, 429, 503; 500 for INTERNAL). */
  get status(): number {
    return STATUS[this.code] ?? 500;
  }

  /** The response headers of the refusal: RFC 6750 challenge, Retry-After. */
  headers(): Record<string, string> {
    const out: Record<string, string> = {};
    if (this.code === Code.PermissionDenied) {
      const scope = this.requiredScopes?.length ? `, scope="${this.requiredScopes.join(" ")}"` : "";
      out["www-authenticate"] = `Bearer realm="tessera", error="insufficient_scope"${scope}`;
    } else if (this.code === Code.Unauthenticated) {
      out["www-authenticate"] =
        this.reason === "AUTH_REQUIRED"
          ? `Bearer realm="tessera"`
          : `Bearer realm="tessera", error="invalid_token", error_description="${this.message.replace(/[^\x20\x21\x23-\x5b\x5d-\x7e]/g, "")}"`;
    }
    if (this.retryAfterSeconds !== undefined) out["retry-after"] = String(this.retryAfterSeconds);
    return out;
  }
}

/**
 * The ConnectError a refusal leaves as: its code, the challenge and Retry-After as headers
 * (gRPC: trailers), and a `google.rpc.ErrorInfo` detail with the reason, as Tessera's own
 * errors carry. Anything that is not a {@link TesseraAuthError} is a fault of the check
 * itself: Unavailable with Retry-After (never an admission, never a leaked internal).
 */
export function toConnectError(err: unknown): ConnectError {
  const e =
    err instanceof TesseraAuthError
      ? err
      : new TesseraAuthError("UNAVAILABLE", "authentication is unavailable", {
          retryAfterSeconds: 1,
          cause: err,
        });
  return new ConnectError(e.message, e.code, e.headers(), [
    { desc: ErrorInfoSchema, value: { reason: e.reason, domain: TESSERA_ERROR_DOMAIN } },
  ]);
}

/** Same as {@link toConnectError}'s first step: any failure as a {@link TesseraAuthError}. */
export function toAuthError(err: unknown): TesseraAuthError {
  return err instanceof TesseraAuthError
    ? err
    : new TesseraAuthError("UNAVAILABLE", "authentication is unavailable", {
        retryAfterSeconds: 1,
        cause: err,
      });
}

/**
 * The refusal of a call that failed with `err`: a {@link TesseraAuthError} as it is (the
 * core makes Tessera's faults, and its own inside `authenticate`, UNAVAILABLE ones, and
 * reports them); anything else failed outside the credential check — a bug of the SDK or of
 * what it was given (a rule of the wrong shape, a context that throws, the handler chain the
 * middleware runs) — and is reported to `report` and answered INTERNAL: a 503 would tell the
 * client to retry what will fail again, and hide a bug as an outage.
 */
export function refusalOf(err: unknown, report: (err: unknown) => void): TesseraAuthError {
  if (err instanceof TesseraAuthError) return err;
  report(err);
  return new TesseraAuthError("INTERNAL", "internal error", { cause: err });
}
