import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { ErrorInfoSchema as LegacyErrorInfoSchema } from "../../gen/tessera/v1/error_details_pb.js";
import {
  AlreadyExistsError,
  AuthenticationError,
  type ClientErrorInit,
  InvalidArgumentError,
  MessageTooLargeError,
  NotFoundError,
  PermissionDeniedError,
  parseRetryAfter,
  RateLimitedError,
  redact,
  TesseraClientError,
  TokenExpiredError,
  UnavailableError,
} from "./errors.js";

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
      // A size limit shares the code of a rate limit, but waiting does not help it.
      // So is an answer past the client's own bound (connect's readMaxBytes; no ErrorInfo).
      if (
        init.reason === "MESSAGE_TOO_LARGE" ||
        (!info && /than configured readMaxBytes/.test(ce.rawMessage))
      )
        return new MessageTooLargeError(message, init);
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
