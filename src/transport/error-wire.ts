import type { OutgoingHttpHeaders } from "node:http";
import { create, toBinary, toJson } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { Code } from "@connectrpc/connect";
import { codeFromString, codeToString } from "@connectrpc/connect/protocol-connect";
import { ErrorInfoSchema } from "../../gen/tessera/v1/error_details_pb.js";
import { addChallenge, type ErrorReason, REASONS, reasonForCode, type TesseraError } from "../errors.js";
import type { WireError } from "./early-answers.js";

/**
 * How a Tessera error looks on the wire beyond what Connect writes: the JSON error
 * envelope of Connect answers, and refusals answered before the RPC pipeline written
 * without a ConnectError at all.
 */

const envelopeHeads = new Map<string, Buffer>();

/** `{"ok":false,"error":…,"reason":…,` for a reason (made once per reason). */
function envelopeText(reason: string): string {
  const spec = REASONS[reason as ErrorReason] as (typeof REASONS)[ErrorReason] | undefined;
  return `{"ok":false,"error":${JSON.stringify(spec?.title ?? "Error")},"reason":${JSON.stringify(reason)},`;
}

/** {@link envelopeText} as bytes (made once per reason). */
function envelopeHead(reason: string): Buffer {
  let head = envelopeHeads.get(reason);
  if (head === undefined) {
    head = Buffer.from(envelopeText(reason));
    // Reasons come from REASONS (a fixed set); anything else is not kept.
    if (reason in REASONS) envelopeHeads.set(reason, head);
  }
  return head;
}

/**
 * Connect unary errors over JSON carry the protocol's `{code, message, details}`. The seeds'
 * clients also expect the envelope fields `ok: false`, `error` (the HTTP reason phrase) and a
 * stable `reason` (e.g. AUTH_REQUIRED, ACCESS_DENIED) with the `request_id`, so these are added
 * at the top level; Connect clients ignore unknown fields. Only error responses are touched.
 *
 * @param known the reason and request id the error interceptor put in the ErrorInfo detail
 *   (`RequestState.errorInfo`), when it did
 */
export function augmentJsonErrorBody(
  chunk: Uint8Array,
  known: { reason: string; requestId: string } | undefined,
): Uint8Array {
  // The usual case, a TesseraError through the error interceptor: its reason and request id
  // are known, and Connect's body is `{"code":…}`, so the envelope is spliced around it
  // (the same bytes the general path below produces, without parsing and re-serialising).
  if (
    known?.reason &&
    known.requestId &&
    chunk[0] === 0x7b &&
    chunk[1] === 0x22 &&
    chunk[chunk.byteLength - 1] === 0x7d
  ) {
    // Spliced as bytes: decoding the body and encoding it again cost more than the splice.
    const tail = Buffer.from(`,"request_id":${JSON.stringify(known.requestId)}}`);
    return Buffer.concat([envelopeHead(known.reason), chunk.subarray(1, -1), tail]);
  }
  try {
    const body = JSON.parse(Buffer.from(chunk).toString("utf8")) as Record<string, unknown>;
    const info = (body.details as { debug?: { reason?: string; requestId?: string } }[] | undefined)?.[0]
      ?.debug;
    // Without an ErrorInfo (Connect's own refusals: malformed JSON, bad framing…) the
    // reason follows the code: a malformed body is INVALID_ARGUMENT, not INTERNAL.
    const code = typeof body.code === "string" ? codeFromString(body.code) : undefined;
    const reason = info?.reason ?? reasonForCode(code ?? Code.Internal);
    const spec = REASONS[reason as ErrorReason] as (typeof REASONS)[ErrorReason] | undefined;
    const out = {
      ok: false,
      error: spec?.title ?? "Error",
      reason,
      ...body,
      request_id: info?.requestId,
    };
    return Buffer.from(JSON.stringify(out));
  } catch {
    // Not JSON after all: send it as it is.
    return chunk;
  }
}

/**
 * What does not change from one refusal with the same error to the next: everything but
 * the request id (which sits inside the ErrorInfo detail, so inside its binary encoding).
 */
interface Shape {
  code: Code;
  /** The error's headers (gRPC: trailers), WWW-Authenticate included, names in lower case. */
  headers: Record<string, string>;
  /** ErrorInfo without its request id, binary (request_id is its last field: appended per call). */
  info: Buffer;
  /** The Connect JSON body with the envelope, up to the request id inside the detail's "debug". */
  jsonHead: string;
  /** google.rpc.Status without its details, binary (details are its last field). */
  status: Buffer;
  grpcMessage: string;
}

/** google.rpc.Status's fields (Connect's gRPC status trailer) and google.protobuf.Any's. */
const STATUS_CODE = 1;
const STATUS_MESSAGE = 2;
const STATUS_DETAILS = 3;
const ANY_TYPE_URL = 1;
const ANY_VALUE = 2;

/** Tags of the length-delimited fields written per call, and the Any's type URL field: encoded once, by protobuf-es. */
const tagOf = (field: number) =>
  Buffer.from(new BinaryWriter().tag(field, WireType.LengthDelimited).finish());
const INFO_REQUEST_ID_TAG = tagOf(ErrorInfoSchema.field.requestId.number);
const STATUS_DETAILS_TAG = tagOf(STATUS_DETAILS);
const ANY_VALUE_TAG = tagOf(ANY_VALUE);
const ANY_TYPE_URL_FIELD = Buffer.from(
  new BinaryWriter()
    .tag(ANY_TYPE_URL, WireType.LengthDelimited)
    .string(`type.googleapis.com/${ErrorInfoSchema.typeName}`)
    .finish(),
);

/** A string JSON writes as it is, between quotes. */
const PLAIN_ID = /^[\w.-]*$/;

/** Shapes of the refusals that recur (the same reason and message, nothing else): a bounded set. */
const shapes = new Map<string, Shape>();
const MAX_SHAPES = 256;

function shapeOf(err: TesseraError): Shape {
  // Headers (Retry-After…) and metadata (required scopes…) vary: such errors are not kept.
  if (!isEmpty(err.headers) || !isEmpty(err.metadata)) return makeShape(err);
  const key = `${err.reason}\n${err.message}`;
  let shape = shapes.get(key);
  if (shape === undefined) {
    shape = makeShape(err);
    if (shapes.size < MAX_SHAPES) shapes.set(key, shape);
  }
  return shape;
}

function isEmpty(o: Record<string, string>): boolean {
  for (const _ in o) return false;
  return true;
}

function makeShape(err: TesseraError): Shape {
  const { code, message, reason } = err;
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(err.headers)) headers[k.toLowerCase()] = v;
  addChallenge(headers, code, reason, message);
  const info = create(ErrorInfoSchema, { reason, domain: "tessera", metadata: err.metadata });
  // The detail as Connect writes it: {"type", "debug" (ErrorInfo's JSON), "value" (base64)}.
  const debug = JSON.stringify(toJson(ErrorInfoSchema, info));
  const jsonHead =
    `${envelopeText(reason)}"code":${JSON.stringify(codeToString(code))}` +
    (message.length > 0 ? `,"message":${JSON.stringify(message)}` : "") +
    `,"details":[{"type":${JSON.stringify(ErrorInfoSchema.typeName)},"debug":${debug.slice(0, -1)},` +
    `${JSON.stringify(ErrorInfoSchema.field.requestId.jsonName)}:`;
  const status = new BinaryWriter();
  if ((code as number) !== 0) status.tag(STATUS_CODE, WireType.Varint).int32(code);
  if (message.length > 0) status.tag(STATUS_MESSAGE, WireType.LengthDelimited).string(message);
  return {
    code,
    headers,
    info: Buffer.from(toBinary(ErrorInfoSchema, info)),
    jsonHead,
    status: Buffer.from(status.finish()),
    grpcMessage: encodeURIComponent(message),
  };
}

/**
 * A TesseraError refusal in wire form, written as Connect writes the ConnectError that
 * `toConnectError` makes of it (the same status, headers, trailers and bytes; test/error-wire.test.ts
 * compares them for every protocol), plus the JSON envelope.
 *
 * Why not Connect's writers: refusing is what a public API does most under attack, and for
 * each refusal they serialise the ErrorInfo detail twice by reflection (binary and JSON), over
 * a ConnectError made with a fetch `Headers`: about a quarter of a refusal's cost in profiles.
 * Here everything but the request id is made once per kind of refusal, by protobuf-es. The
 * per-call part is the request id: appended to the ErrorInfo as its last field (a serialised
 * message followed by more fields is the message with those fields, by the protobuf
 * encoding's rules), and that ErrorInfo wrapped in the Status's Any.
 *
 * Why those few bytes by hand, not protobuf-es's `create` + `toBinary` per call: measured
 * again for issue #19 (CPU time, 50k refusals): a whole gRPC refusal made here costs
 * 1.7–1.9 µs, while `toBinary` of the ErrorInfo alone costs 2.0–2.5 µs and the detail
 * chain (ErrorInfo, Any, Status) 5–6 µs: about 5 % of a refused call's server CPU, on the
 * path an attacker drives (bench/results/2026-12-05-transport-ab.md). The tags and every
 * constant part are still protobuf-es's; only the per-call length varint is written here
 * (a tag, a varint length and the bytes), and the test compares every result with Connect's.
 */
class Refusal implements WireError {
  constructor(
    private readonly shape: Shape,
    private readonly requestId: string,
    /** Headers the request collected before it was refused (X-RateLimit-*), added unless the error sets them. */
    private readonly extra: Record<string, string> | undefined,
  ) {}

  get code(): Code {
    return this.shape.code;
  }

  connect(): { header: OutgoingHttpHeaders; body: Uint8Array } {
    const { shape, requestId } = this;
    // Request ids are plain ASCII (server.ts): quoted as they are, without JSON.stringify.
    const id = PLAIN_ID.test(requestId) ? `"${requestId}"` : JSON.stringify(requestId);
    const body = Buffer.from(
      `${shape.jsonHead}${id}},"value":"${base64Raw(this.info())}"}],"request_id":${id}}`,
    );
    const header = this.headers();
    header["content-type"] = "application/json";
    header["content-length"] = body.byteLength;
    return { header, body };
  }

  grpcTrailers(): OutgoingHttpHeaders {
    const { shape } = this;
    // Status { code, message, details: [Any { type_url, value: ErrorInfo }] }
    const any = appendField(ANY_TYPE_URL_FIELD, ANY_VALUE_TAG, this.info());
    const status = appendField(shape.status, STATUS_DETAILS_TAG, any);
    const trailer = this.headers();
    trailer["grpc-status"] = String(shape.code);
    trailer["grpc-message"] = shape.grpcMessage;
    trailer["grpc-status-details-bin"] = base64Raw(status);
    return trailer;
  }

  /** The ErrorInfo: the shape's, then request_id. */
  private info(): Buffer {
    return appendField(this.shape.info, INFO_REQUEST_ID_TAG, Buffer.from(this.requestId));
  }

  /**
   * A new object with the error's headers and the collected ones. Copied key by key: a copy
   * made by spreading, then added to, cost about 1.7 µs here (V8 gives the spread copy no
   * room to grow), against 0.03 µs.
   */
  private headers(): OutgoingHttpHeaders {
    const own = this.shape.headers;
    const header: OutgoingHttpHeaders = {};
    for (const k in own) header[k] = own[k];
    if (this.extra) for (const k in this.extra) if (!(k in own)) header[k] = this.extra[k];
    return header;
  }
}

/**
 * `message` (serialised) followed by one more length-delimited field: its `tag` (encoded),
 * the varint length of `value`, and `value`.
 */
function appendField(message: Buffer, tag: Buffer, value: Buffer): Buffer {
  let n = value.length;
  const out = Buffer.allocUnsafe(message.length + tag.length + 5 + n);
  let at = message.copy(out, 0);
  at += tag.copy(out, at);
  while (n >= 0x80) {
    out[at++] = (n & 0x7f) | 0x80;
    n >>>= 7;
  }
  out[at++] = n;
  at += value.copy(out, at);
  return out.subarray(0, at);
}

/** Standard base64 without padding, as Connect writes binary values ("std_raw"). */
function base64Raw(bytes: Buffer): string {
  const text = bytes.toString("base64");
  const end = text.endsWith("==") ? text.length - 2 : text.endsWith("=") ? text.length - 1 : text.length;
  return end === text.length ? text : text.slice(0, end);
}

/**
 * The answer to a request refused with `err` before the RPC pipeline.
 *
 * @param requestId the request's id (never empty)
 * @param extra headers the request collected before the refusal (X-RateLimit-*)
 */
export function refusalOnTheWire(
  err: TesseraError,
  requestId: string,
  extra: Record<string, string> | undefined,
): WireError {
  return new Refusal(shapeOf(err), requestId, extra);
}
