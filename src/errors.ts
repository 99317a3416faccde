import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { type ErrorInfo, ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import type { TesseraAuthReason } from "./sdk/server/errors.js";

/**
 * The `domain` of the `google.rpc.ErrorInfo` every Tessera error carries: the product, not
 * an instance's host name, so that a client recognises Tessera's reasons behind any
 * address (AIP-193 asks for a globally unique, DNS-like name).
 */
export const ERROR_DOMAIN = "tessera.dev";

/** The `google.rpc.ErrorInfo` metadata key of the failed request's id (its `X-Request-Id`). */
export const REQUEST_ID_KEY = "request_id";

/**
 * The `google.rpc.ErrorInfo` detail of a Tessera error: its reason, {@link ERROR_DOMAIN},
 * and its metadata with the request id last (error-wire.ts appends it to the bytes of
 * the rest, which gives the same encoding only when it is the last map entry).
 */
export function errorInfo(
  reason: string,
  metadata: Readonly<Record<string, string>>,
  requestId: string,
): ErrorInfo {
  const all: Record<string, string> = {};
  for (const k in metadata) if (k !== REQUEST_ID_KEY) all[k] = metadata[k]!;
  all[REQUEST_ID_KEY] = requestId;
  return create(ErrorInfoSchema, { reason, domain: ERROR_DOMAIN, metadata: all });
}

/** The Tessera ErrorInfo among a ConnectError's details (domain {@link ERROR_DOMAIN}), if any. */
export function tesseraErrorInfo(err: ConnectError): ErrorInfo | undefined {
  return err.findDetails(ErrorInfoSchema).find((info) => info.domain === ERROR_DOMAIN);
}

/**
 * Stable reason codes of Tessera errors. Clients (and tests) switch on these; the
 * message is for humans and may change. Each maps to exactly one Connect code in
 * {@link REASONS}, the one place that decides codes, HTTP statuses and headers. The
 * refusals of authentication are the SDK's (a service Tessera protects refuses with the
 * same words); the SDK ships without the server, so the server takes them from it.
 */
export type ErrorReason =
  | TesseraAuthReason
  | "MULTIPLE_CREDENTIALS"
  | "INVALID_ARGUMENT"
  | "MESSAGE_TOO_LARGE"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "FAILED_PRECONDITION"
  | "UNIMPLEMENTED"
  | "DEADLINE_EXCEEDED"
  | "CANCELED"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "INTERNAL";

interface ReasonSpec {
  code: Code;
  /** The seed's short "error" word for the HTTP JSON envelope. */
  title: string;
  /** For 401s: whether a credential was presented (RFC 6750 error="invalid_token"). */
  invalidToken?: boolean;
}

/** The single mapping from reason to Connect code (and so to HTTP status). */
export const REASONS: Readonly<Record<ErrorReason, ReasonSpec>> = {
  AUTH_REQUIRED: { code: Code.Unauthenticated, title: "Unauthorized" },
  AUTH_HEADER_MALFORMED: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  MULTIPLE_CREDENTIALS: { code: Code.InvalidArgument, title: "Bad Request" },
  TOKEN_INVALID: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  TOKEN_EXPIRED: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  TOKEN_REVOKED: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  TOKEN_NOT_BOUND: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  CREDENTIALS_INVALID: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  PRINCIPAL_DISABLED: { code: Code.Unauthenticated, title: "Unauthorized", invalidToken: true },
  ACCESS_DENIED: { code: Code.PermissionDenied, title: "Forbidden" },
  PRINCIPAL_NOT_ALLOWED: { code: Code.PermissionDenied, title: "Forbidden" },
  INVALID_ARGUMENT: { code: Code.InvalidArgument, title: "Bad Request" },
  NOT_FOUND: { code: Code.NotFound, title: "Not Found" },
  ALREADY_EXISTS: { code: Code.AlreadyExists, title: "Conflict" },
  FAILED_PRECONDITION: { code: Code.FailedPrecondition, title: "Precondition Failed" },
  RATE_LIMITED: { code: Code.ResourceExhausted, title: "Too Many Requests" },
  // A request over a size limit: ResourceExhausted as Connect raises it (so HTTP 429), but
  // not a rate limit, which tells a client to retry later; the same request never passes.
  MESSAGE_TOO_LARGE: { code: Code.ResourceExhausted, title: "Content Too Large" },
  UNAVAILABLE: { code: Code.Unavailable, title: "Service Unavailable" },
  // The other codes Connect itself answers with (an encoding Tessera does not support, a
  // deadline that passed…): named after their code, so that only Tessera's faults say INTERNAL.
  UNIMPLEMENTED: { code: Code.Unimplemented, title: "Not Implemented" },
  DEADLINE_EXCEEDED: { code: Code.DeadlineExceeded, title: "Gateway Timeout" },
  CANCELED: { code: Code.Canceled, title: "Client Closed Request" },
  ABORTED: { code: Code.Aborted, title: "Conflict" },
  OUT_OF_RANGE: { code: Code.OutOfRange, title: "Bad Request" },
  INTERNAL: { code: Code.Internal, title: "Internal Server Error" },
};

/** Options of a {@link TesseraError}. */
export interface TesseraErrorOptions {
  /** Response headers (Connect) / trailers (gRPC), e.g. Retry-After. Never secrets. */
  headers?: Record<string, string>;
  /** Non-secret context returned in ErrorInfo.metadata (the request id is added there on the wire). */
  metadata?: Record<string, string>;
  cause?: unknown;
}

/**
 * Whether a code is a refusal of the client's request (4xx: bad credential, no permission,
 * bad argument, rate limited…) rather than a fault. A refusal is an expected outcome:
 * no stack trace is captured for it (with async frames, capturing one was the costliest
 * part of refusing a credential, dearer than accepting one). Faults keep their stack.
 */
export function isRefusal(code: Code): boolean {
  return (
    code !== Code.Internal && code !== Code.Unknown && code !== Code.Unavailable && code !== Code.DataLoss
  );
}

/** The one domain error type. Messages must never contain a credential. */
export class TesseraError extends Error {
  override readonly name = "TesseraError";
  readonly reason: ErrorReason;
  readonly headers: Record<string, string>;
  readonly metadata: Record<string, string>;

  constructor(reason: ErrorReason, message: string, options: TesseraErrorOptions = {}) {
    const limit = Error.stackTraceLimit;
    if (isRefusal(REASONS[reason].code)) Error.stackTraceLimit = 0;
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    Error.stackTraceLimit = limit;
    this.reason = reason;
    this.headers = options.headers ?? {};
    this.metadata = options.metadata ?? {};
  }

  /** The Connect code this error maps to. */
  get code(): Code {
    return REASONS[this.reason].code;
  }
}

/** RFC 6750 WWW-Authenticate value for a 401/403. */
export function wwwAuthenticate(
  reason: ErrorReason,
  message: string,
  requiredScopes?: readonly string[],
): string {
  const spec = REASONS[reason];
  if (spec.code === Code.PermissionDenied) {
    const scope = requiredScopes && requiredScopes.length > 0 ? `, scope="${requiredScopes.join(" ")}"` : "";
    return `Bearer realm="tessera", error="insufficient_scope"${scope}`;
  }
  if (spec.invalidToken) {
    // error_description is restricted to %x20-21 / %x23-5B / %x5D-7E: strip quotes and backslashes.
    const description = message.replace(/["\\]/g, "'").replace(/[^\x20-\x7e]/g, "");
    return `Bearer realm="tessera", error="invalid_token", error_description="${description}"`;
  }
  return `Bearer realm="tessera"`;
}

/**
 * Add to an error's `headers` the WWW-Authenticate challenge a 401 or 403 answer carries,
 * unless it has one already.
 */
export function addChallenge(
  headers: Record<string, string>,
  code: Code,
  reason: ErrorReason,
  message: string,
  requiredScopes?: readonly string[],
): Record<string, string> {
  if ((code === Code.Unauthenticated || code === Code.PermissionDenied) && !headers["www-authenticate"]) {
    headers["www-authenticate"] = wwwAuthenticate(reason, message, requiredScopes);
  }
  return headers;
}

/**
 * Convert anything thrown by a handler or interceptor into the ConnectError sent on the
 * wire: reason and request id in a `google.rpc.ErrorInfo` detail, headers for 401/403/429.
 * Unknown errors become Internal with a generic message so internals never leak.
 */
export function toConnectError(
  err: unknown,
  requestId: string,
  requiredScopes?: readonly string[],
): ConnectError {
  let reason: ErrorReason;
  let message: string;
  let headers: Record<string, string> = {};
  let metadata: Record<string, string> = {};
  let code: Code;
  if (err instanceof TesseraError) {
    reason = err.reason;
    message = err.message;
    headers = { ...err.headers };
    metadata = err.metadata;
    code = err.code;
  } else if (err instanceof ConnectError) {
    // Errors raised by connect itself (bad framing, message too large, unknown method).
    if (tesseraErrorInfo(err) !== undefined) return err;
    code = err.code;
    reason = reasonForCode(err.code);
    message = err.rawMessage;
  } else {
    code = Code.Internal;
    reason = "INTERNAL";
    message = "internal error";
  }
  addChallenge(headers, code, reason, message, requiredScopes);
  const info = errorInfo(reason, metadata, requestId);
  const limit = Error.stackTraceLimit;
  if (isRefusal(code)) Error.stackTraceLimit = 0;
  const ce = new ConnectError(message, code, headers, [{ desc: ErrorInfoSchema, value: info }], err);
  Error.stackTraceLimit = limit;
  return ce;
}

/**
 * The reason of an error that carries only a Connect code (raised by Connect itself: framing,
 * parsing, limits). Connect's ResourceExhausted is always a size limit (a message or body too
 * large): Tessera's rate limits are TesseraErrors with reason RATE_LIMITED.
 */
export function reasonForCode(code: Code): ErrorReason {
  return REASON_OF_CODE[code] ?? "INTERNAL";
}

const REASON_OF_CODE: Partial<Record<Code, ErrorReason>> = {
  [Code.Unauthenticated]: "TOKEN_INVALID",
  [Code.PermissionDenied]: "ACCESS_DENIED",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.ResourceExhausted]: "MESSAGE_TOO_LARGE",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.Canceled]: "CANCELED",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
};

/** Shorthands for the common cases. */
export const errors = {
  invalidArgument: (message: string, field?: string) =>
    new TesseraError("INVALID_ARGUMENT", message, field ? { metadata: { field } } : {}),
  notFound: (what: string) => new TesseraError("NOT_FOUND", `${what} not found`),
  alreadyExists: (message: string) => new TesseraError("ALREADY_EXISTS", message),
  accessDenied: (message = "insufficient permissions") => new TesseraError("ACCESS_DENIED", message),
};
