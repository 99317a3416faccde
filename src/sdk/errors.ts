import type { Code } from "@connectrpc/connect";

// The client's error classes. Mapping a failed call to them (toClientError) is in
// error-mapping.ts, with the generated ErrorInfo descriptors it decodes: a program that
// only names these classes (the CLI before a call fails) does not load them, nor the
// Connect runtime, whose start loads protobuf's descriptors (hence `Code` as a type only).

/** `Code.InvalidArgument` (test/sdk-errors.test.ts checks the value). */
const INVALID_ARGUMENT = 3 as Code.InvalidArgument;

/**
 * Typed errors of the Tessera client SDK. Every failed call is mapped by
 * {@link toClientError} (the one place that decides the class) to a
 * {@link TesseraClientError} subclass a caller can `instanceof` or switch on:
 * `code` is the Connect code, `reason` the server's stable reason from the
 * `google.rpc.ErrorInfo` detail (e.g. `TOKEN_EXPIRED`), `requestId` the id to quote
 * to support. Messages never contain a credential: the server never puts one there,
 * and client-side messages are scrubbed of the tokens the client holds.
 *
 * These classes extend `Error`, not `ConnectError`: connect-es recognises its own
 * errors by name, so a subclass with its own name would not pass `instanceof
 * ConnectError` anyway. The original `ConnectError` is kept as `cause`.
 */
export class TesseraClientError extends Error {
  /** The Connect (gRPC) status code. */
  readonly code: Code;
  /** The server's stable reason (ErrorInfo.reason), e.g. "TOKEN_EXPIRED"; undefined when the server sent none. */
  readonly reason: string | undefined;
  /** The request id of the failed call (ErrorInfo.metadata.request_id or the X-Request-Id header). */
  readonly requestId: string | undefined;
  /** Response headers / trailers of the failed call (Retry-After, X-RateLimit-*, WWW-Authenticate). */
  readonly metadata: Headers;
  /** ErrorInfo.metadata but the request id: non-secret context such as `required_scopes` or `field`. */
  readonly details: Readonly<Record<string, string>>;

  constructor(message: string, init: ClientErrorInit) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.code = init.code;
    this.reason = init.reason;
    this.requestId = init.requestId;
    this.metadata = init.metadata ?? new Headers();
    this.details = init.details ?? {};
  }
}

/** Fields of a {@link TesseraClientError}. */
export interface ClientErrorInit {
  code: Code;
  reason?: string | undefined;
  requestId?: string | undefined;
  metadata?: Headers;
  details?: Record<string, string>;
  cause?: unknown;
}

/** Unauthenticated: no credential, or one the server does not accept (reason says why). */
export class AuthenticationError extends TesseraClientError {}

/** Unauthenticated with reason TOKEN_EXPIRED: refresh the session or log in again. */
export class TokenExpiredError extends AuthenticationError {}

/** PermissionDenied: authenticated, but the credential lacks a scope or the principal kind is not admitted. */
export class PermissionDeniedError extends TesseraClientError {
  /** The scopes the method requires, when the server named them. */
  get requiredScopes(): string[] {
    const s = this.details.required_scopes;
    return s ? s.split(" ").filter((x) => x.length > 0) : [];
  }
}

/** NotFound: the resource does not exist or belongs to another tenant. */
export class NotFoundError extends TesseraClientError {}

/** InvalidArgument: the request is malformed; `details.field` may name the field. */
export class InvalidArgumentError extends TesseraClientError {}

/** AlreadyExists: a resource with that name exists. */
export class AlreadyExistsError extends TesseraClientError {}

/** ResourceExhausted: rate limited. Wait `retryAfter` seconds before trying again. */
export class RateLimitedError extends TesseraClientError {
  /** Seconds to wait, from the Retry-After header or trailer; undefined when absent. */
  readonly retryAfter: number | undefined;

  constructor(message: string, init: ClientErrorInit & { retryAfter?: number | undefined }) {
    super(message, init);
    this.retryAfter = init.retryAfter;
  }
}

/**
 * ResourceExhausted with reason MESSAGE_TOO_LARGE: the request (a message, or the whole body)
 * is over the server's size limit. Not a rate limit: the same request never passes, so
 * retrying it does not help.
 */
export class MessageTooLargeError extends TesseraClientError {}

/** Unavailable: the server cannot be reached (wrong address, TLS refused, down) or is not ready. */
export class UnavailableError extends TesseraClientError {}

/**
 * A client-side configuration problem: an unreadable certificate file, a malformed
 * server address or token, a credentials file others can read, `verifySsl: false`
 * without `insecure: true`. Raised before any call is made; its `code` is
 * InvalidArgument (the caller's mistake) and it has no `reason` or `requestId`, since
 * no server answered. A subclass of {@link TesseraClientError} like every SDK error, so
 * one `catch` clause sees them all.
 */
export class ClientConfigError extends TesseraClientError {
  /** The file the problem is about, when there is one. */
  readonly path: string | undefined;

  constructor(message: string, options: { path?: string; cause?: unknown } = {}) {
    super(message, { code: INVALID_ARGUMENT, cause: options.cause });
    this.path = options.path;
  }
}

/** The credentials file is readable or writable by group or others, or owned by someone else. */
export class CredentialsFileError extends ClientConfigError {}

/** Parse a Retry-After value (delta-seconds or an HTTP date) into seconds. */
export function parseRetryAfter(value: string | null | undefined, now = Date.now()): number | undefined {
  if (!value) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number.parseInt(trimmed, 10);
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, Math.ceil((date - now) / 1000));
}

const REDACTED = "[redacted]";

/** Replace every occurrence of a held secret in `text`. */
export function redact(
  text: string,
  secrets: readonly (string | undefined)[],
): { text: string; changed: boolean } {
  let out = text;
  for (const s of secrets) {
    // Short strings would over-match ordinary words; credentials are long.
    if (s && s.length >= 8 && out.includes(s)) out = out.split(s).join(REDACTED);
  }
  return { text: out, changed: out !== text };
}

// Each class's `name`, set once on its prototype from this table (as Error.prototype's
// own: not enumerable): an object's keys survive a minifier that renames the classes.
for (const [name, cls] of Object.entries({
  TesseraClientError,
  AuthenticationError,
  TokenExpiredError,
  PermissionDeniedError,
  NotFoundError,
  InvalidArgumentError,
  AlreadyExistsError,
  RateLimitedError,
  MessageTooLargeError,
  UnavailableError,
  ClientConfigError,
  CredentialsFileError,
}))
  Object.defineProperty(cls.prototype, "name", { value: name, writable: true, configurable: true });
