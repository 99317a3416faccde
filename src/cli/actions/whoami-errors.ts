import type { IncomingHttpHeaders } from "node:http2";
import { appendHeaders, Code, ConnectError } from "@connectrpc/connect";
import { errorFromJsonBytes, trailerDemux, validateResponse } from "@connectrpc/connect/protocol-connect";
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

const RST_CODES: Record<number, [string, Code]> = {
  1: ["PROTOCOL_ERROR", Code.Internal],
  2: ["INTERNAL_ERROR", Code.Internal],
  3: ["FLOW_CONTROL_ERROR", Code.Internal],
  4: ["SETTINGS_TIMEOUT", Code.Internal],
  6: ["FRAME_SIZE_ERROR", Code.Internal],
  7: ["REFUSED_STREAM", Code.Unavailable],
  8: ["CANCEL", Code.Canceled],
  9: ["COMPRESSION_ERROR", Code.Internal],
  10: ["CONNECT_ERROR", Code.Internal],
  11: ["ENHANCE_YOUR_CALM", Code.ResourceExhausted],
  12: ["INADEQUATE_SECURITY", Code.PermissionDenied],
  13: ["HTTP_1_1_REQUIRED", Code.PermissionDenied],
};

/** A stream that closed without a whole answer, as connect-node reports it. */
export function resetError(rstCode: number, secrets: string[]): Error {
  const known = RST_CODES[rstCode];
  const err = known
    ? new ConnectError(
        `http/2 stream closed with error code ${known[0]} (0x${rstCode.toString(16)})`,
        known[1],
      )
    : new ConnectError("http/2 stream closed without a response", Code.Aborted);
  return toClientError(err, secrets);
}
