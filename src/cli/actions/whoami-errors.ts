import type { IncomingHttpHeaders } from "node:http2";
import { appendHeaders, Code, ConnectError } from "@connectrpc/connect";
import { errorFromJsonBytes, trailerDemux, validateResponse } from "@connectrpc/connect/protocol-connect";
import { MAX_ANSWER_BYTES } from "../../sdk/connection.js";
import { toClientError } from "../../sdk/error-mapping.js";

// What whoami's own call (whoami.ts) loads when it fails: the error the SDK client's Connect
// transport makes of the same failure, by the same functions where Connect exports them
// (the answer's status, content type and JSON error body) and as connect-node makes it
// where it does not (a transport error, a reset stream, the deadline), mapped by the SDK.

/** The answer's headers as Connect's client sees them (no pseudo-headers). */
function headersOf(h: IncomingHttpHeaders): Headers {
  const headers = new Headers();
  for (const [k, v] of Object.entries(h)) {
    if (k.startsWith(":") || v === undefined) continue;
    for (const one of Array.isArray(v) ? v : [v]) headers.append(k, one);
  }
  return headers;
}

/**
 * The error an answer is (status, content type, JSON error body), as Connect's unary
 * client decides it; undefined when it is a success after all.
 */
export function answerError(
  status: number,
  h: IncomingHttpHeaders,
  body: Uint8Array,
  secrets: string[],
): Error | undefined {
  try {
    const headers = headersOf(h);
    if (headers.get("content-encoding") && headers.get("content-encoding") !== "identity")
      throw new ConnectError(
        `unsupported response encoding "${headers.get("content-encoding")}"`,
        Code.Internal,
        headers,
      );
    const { isUnaryError, unaryError } = validateResponse("unary", false, status, headers);
    if (!isUnaryError) return undefined;
    const [header, trailer] = trailerDemux(headers);
    return toClientError(errorFromJsonBytes(body, appendHeaders(header, trailer), unaryError), secrets);
  } catch (err) {
    return toClientError(err, secrets);
  }
}

/** connect-node's connectErrorFromNodeReason: a Node error of the connection or stream. */
export function transportError(reason: unknown, secrets: string[]): Error {
  const chain: Error[] = [];
  for (let r = reason; r instanceof Error && !chain.includes(r); r = r.cause) {
    chain.push(r);
    if (!("cause" in r)) break;
  }
  const has = (...codes: string[]) =>
    chain.some((e) => {
      const c = (e as { code?: unknown }).code;
      return typeof c === "string" && codes.includes(c);
    });
  let code = Code.Internal;
  if (has("ERR_STREAM_WRITE_AFTER_END", "ERR_STREAM_DESTROYED", "ERR_HTTP2_INVALID_STREAM", "ECONNRESET"))
    code = Code.Aborted;
  else if (has("ETIMEDOUT", "ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED")) code = Code.Unavailable;
  const ce = ConnectError.from(reason, code);
  if (ce !== reason) ce.cause = reason;
  return toClientError(ce, secrets);
}

/** The deadline passed: the error Connect's deadline signal raises. */
export function deadlineError(secrets: string[]): Error {
  return toClientError(new ConnectError("the operation timed out", Code.DeadlineExceeded), secrets);
}

// RFC 9113 §7's error codes by value, and the Connect code connect-node gives a stream reset
// with one (connectErrorFromH2ResetCode): Internal but for these; NO_ERROR and STREAM_CLOSED
// are not mapped (a stream closed without an answer).
const H2_ERRORS =
  "NO_ERROR PROTOCOL_ERROR INTERNAL_ERROR FLOW_CONTROL_ERROR SETTINGS_TIMEOUT STREAM_CLOSED FRAME_SIZE_ERROR REFUSED_STREAM CANCEL COMPRESSION_ERROR CONNECT_ERROR ENHANCE_YOUR_CALM INADEQUATE_SECURITY HTTP_1_1_REQUIRED".split(
    " ",
  );
const RST_CODES: Record<string, Code> = {
  REFUSED_STREAM: Code.Unavailable,
  CANCEL: Code.Canceled,
  ENHANCE_YOUR_CALM: Code.ResourceExhausted,
  INADEQUATE_SECURITY: Code.PermissionDenied,
  HTTP_1_1_REQUIRED: Code.PermissionDenied,
};

/** A stream that closed without a whole answer, as connect-node reports it. */
export function resetError(rstCode: number, secrets: string[]): Error {
  const name = rstCode === 0 || rstCode === 5 ? undefined : H2_ERRORS[rstCode];
  const err = name
    ? new ConnectError(
        `http/2 stream closed with error code ${name} (0x${rstCode.toString(16)})`,
        RST_CODES[name] ?? Code.Internal,
      )
    : new ConnectError("http/2 stream closed without a response", Code.Aborted);
  return toClientError(err, secrets);
}

/** An answer past {@link MAX_ANSWER_BYTES}: the error connect-node's client makes of it. */
export function tooLargeError(secrets: string[]): Error {
  return toClientError(
    new ConnectError(
      `message size is larger than configured readMaxBytes ${MAX_ANSWER_BYTES}`,
      Code.ResourceExhausted,
    ),
    secrets,
  );
}
