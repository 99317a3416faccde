import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { ErrorInfoSchema as LegacyErrorInfoSchema } from "../../gen/tessera/v1/error_details_pb.js";

/** The `domain` of Tessera's `google.rpc.ErrorInfo` (the server's `ERROR_DOMAIN`). */
const TESSERA_DOMAIN = "tessera.dev";

/**
 * The reason, request id and metadata a failed call's error detail carries: the
 * `google.rpc.ErrorInfo` of domain "tessera.dev" (metadata `request_id` holds the request
 * id), or else the `tessera.v1.ErrorInfo` that servers before it sent (read for one
 * release; see CHANGELOG.md). Undefined when the error carries neither (a proxy's, a
 * failure to connect).
 */
export function errorDetail(
  err: ConnectError,
): { reason: string; requestId: string | undefined; metadata: Record<string, string> } | undefined {
  const info = err.findDetails(ErrorInfoSchema).find((i) => i.domain === TESSERA_DOMAIN);
  if (info !== undefined) {
    const { request_id: requestId, ...metadata } = info.metadata;
    return { reason: info.reason, requestId: requestId || undefined, metadata };
  }
  const legacy = err.findDetails(LegacyErrorInfoSchema)[0];
  if (legacy !== undefined)
    return {
      reason: legacy.reason,
      requestId: legacy.requestId || undefined,
      metadata: { ...legacy.metadata },
    };
  return undefined;
}

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
    super(message, { code: Code.InvalidArgument, cause: options.cause });
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

/**
 * Map anything a call threw to a typed error. `secrets` are the credentials the client
 * holds; any that appears in a message (only possible for client-side errors) is
 * replaced, and the original error is then dropped rather than kept as `cause`.
 */
export function toClientError(
  err: unknown,
  secrets: readonly (string | undefined)[] = [],
): TesseraClientError {
  if (err instanceof TesseraClientError) return err;
  const ce = ConnectError.from(err);
  const info = errorDetail(ce);
  const tls = info ? undefined : tlsFailure(ce);
  const { text: message, changed } = redact(tls?.message ?? ce.rawMessage, secrets);
  const init: ClientErrorInit = {
    code: tls ? Code.Unavailable : ce.code,
    reason: info?.reason || undefined,
    requestId: info?.requestId || ce.metadata.get("x-request-id") || undefined,
    metadata: ce.metadata,
    details: info ? info.metadata : {},
    ...(changed ? {} : { cause: ce }),
  };
  switch (init.code) {
    case Code.Unauthenticated:
      return init.reason === "TOKEN_EXPIRED"
        ? new TokenExpiredError(message, init)
        : new AuthenticationError(message, init);
    case Code.PermissionDenied:
      return new PermissionDeniedError(message, init);
    case Code.NotFound:
      return new NotFoundError(message, init);
    case Code.InvalidArgument:
      return new InvalidArgumentError(message, init);
    case Code.AlreadyExists:
      return new AlreadyExistsError(message, init);
    case Code.ResourceExhausted:
      return new RateLimitedError(message, {
        ...init,
        retryAfter: parseRetryAfter(ce.metadata.get("retry-after")),
      });
    case Code.Unavailable:
      return new UnavailableError(message, init);
    default:
      return new TesseraClientError(message, init);
  }
}

/**
 * A failed TLS handshake (untrusted server certificate, wrong host name, client
 * certificate required or refused) reaches connect-node as Internal or Unknown; it is a
 * failure to reach the server, so it becomes Unavailable with a message saying what to
 * fix. Undefined when the error is not one.
 */
function tlsFailure(ce: ConnectError): { message: string } | undefined {
  let code: string | undefined;
  for (let c: unknown = ce.cause, i = 0; c && i < 5; c = (c as { cause?: unknown }).cause, i++) {
    const k = (c as { code?: unknown }).code;
    if (typeof k === "string") {
      code = k;
      break;
    }
  }
  if (!code) return undefined;
  if (/CERTIFICATE_REQUIRED/.test(code)) {
    return {
      message:
        "TLS handshake failed: the server requires a client certificate (a cert folder with client.crt and client.key)",
    };
  }
  if (/^ERR_SSL_.*(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|REVOKED|EXPIRED)/.test(code)) {
    return { message: `TLS handshake failed: the server refused the client certificate (${code})` };
  }
  if (code === "ERR_TLS_CERT_ALTNAME_INVALID") {
    return {
      message: `TLS handshake failed: the server's certificate is not valid for this host name (${code})`,
    };
  }
  if (/^(SELF_SIGNED|DEPTH_ZERO|UNABLE_TO_|CERT_|ERR_TLS_|ERR_SSL_)/.test(code)) {
    const detail = ce.rawMessage.split("\n")[0]!.slice(0, 160);
    return {
      message: `TLS handshake failed: cannot verify the server's certificate: ${detail} (${code}); give its CA with caFile or a cert folder holding ca.crt`,
    };
  }
  return undefined;
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
  UnavailableError,
  ClientConfigError,
  CredentialsFileError,
}))
  Object.defineProperty(cls.prototype, "name", { value: name, writable: true, configurable: true });
