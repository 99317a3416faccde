import type { OutgoingHttpHeaders } from "node:http";
import { create, toBinary, toJson } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { AnySchema } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { codeFromString, codeToString } from "@connectrpc/connect/protocol-connect";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import {
  addChallenge,
  ERROR_DOMAIN,
  type ErrorReason,
  errorInfo,
  REASONS,
  REQUEST_ID_KEY,
  reasonForCode,
  type TesseraError,
} from "../errors.js";
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

/** A detail of Connect's JSON error body, with the ErrorInfo's JSON as its "debug". */
interface JsonDetail {
  type?: string;
  debug?: { reason?: string; domain?: string; metadata?: Record<string, string> };
}

/**
 * Connect unary errors (a JSON body whatever the request's content type) carry the protocol's `{code, message, details}`. The seeds'
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
    const info = (body.details as JsonDetail[] | undefined)?.find(
      (d) => d.type === ErrorInfoSchema.typeName && d.debug?.domain === ERROR_DOMAIN,
    )?.debug;
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
      request_id: info?.metadata?.[REQUEST_ID_KEY],
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
  /** google.rpc.ErrorInfo without its request id, binary (the request id is its last map entry: appended per call). */
  info: Buffer;
  /** The Connect JSON body with the envelope, up to the request id inside the detail's "debug". */
  jsonHead: string;
  /** What follows that request id in "debug", up to the detail's "value". */
  jsonDebugTail: string;
  /** google.rpc.Status without its details, binary (details are its last field). */
  status: Buffer;
  grpcMessage: string;
}

/** Tags of the length-delimited fields written per call, and the Any's type URL field: encoded once, by protobuf-es. */
const tagOf = (field: number) =>
  Buffer.from(new BinaryWriter().tag(field, WireType.LengthDelimited).finish());
const INFO_METADATA_TAG = tagOf(ErrorInfoSchema.field.metadata.number);
/** A map entry's value field (2); its key (1) is the constant {@link REQUEST_ID_KEY_FIELD}. */
const ENTRY_VALUE_TAG = tagOf(2);
const REQUEST_ID_KEY_FIELD = Buffer.from(
  new BinaryWriter().tag(1, WireType.LengthDelimited).string(REQUEST_ID_KEY).finish(),
);
const STATUS_DETAILS_TAG = tagOf(StatusSchema.field.details.number);
const ANY_VALUE_TAG = tagOf(AnySchema.field.value.number);
const ANY_TYPE_URL_FIELD = Buffer.from(
  toBinary(AnySchema, create(AnySchema, { typeUrl: `type.googleapis.com/${ErrorInfoSchema.typeName}` })),
);

/** A string JSON writes as it is, between quotes. */
const PLAIN_ID = /^[\w.-]*$/;
/** Stands for the request id in the JSON made once per shape: cut out, the id goes in its place. */
const ID_MARK = "\u0000request-id\u0000";

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
  // The ErrorInfo toConnectError makes, with a mark for the request id (the last map entry).
  const marked = errorInfo(reason, err.metadata, ID_MARK);
  // The detail as Connect writes it: {"type", "debug" (ErrorInfo's JSON), "value" (base64)}.
  const debug = JSON.stringify(toJson(ErrorInfoSchema, marked));
  const { [REQUEST_ID_KEY]: _mark, ...metadata } = marked.metadata;
  const info = create(ErrorInfoSchema, { reason, domain: marked.domain, metadata });
  const [debugHead, debugTail] = debug.split(JSON.stringify(ID_MARK)) as [string, string];
  const jsonHead =
    `${envelopeText(reason)}"code":${JSON.stringify(codeToString(code))}` +
    (message.length > 0 ? `,"message":${JSON.stringify(message)}` : "") +
    `,"details":[{"type":${JSON.stringify(ErrorInfoSchema.typeName)},"debug":${debugHead}`;
  return {
    code,
    headers,
    info: Buffer.from(toBinary(ErrorInfoSchema, info)),
    jsonHead,
    jsonDebugTail: debugTail,
    status: Buffer.from(toBinary(StatusSchema, create(StatusSchema, { code, message }))),
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
 * per-call part is the request id: appended to the ErrorInfo as its last metadata entry (a
 * serialised message followed by more fields is the message with those fields, and map
 * entries are repeated fields, by the protobuf encoding's rules), and that ErrorInfo
 * wrapped in the Status's Any.
 *
 * Why those few bytes by hand, not protobuf-es's `create` + `toBinary` per call: the whole
 * detail chain (ErrorInfo, Any, Status) encoded per call costs several times what this does,
 * on the path an attacker drives (measured for issue 19: bench/results/2026-12-05-transport-ab.md
 * and the commit that wrote this). The tags and every
 * constant part are still protobuf-es's; only the per-call length varints are written here
 * (see {@link statusWithRequestId}), and the test compares every result with Connect's.
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
    // Request ids are plain ASCII (server/request-facts.ts): quoted as they are, without JSON.stringify.
    const id = PLAIN_ID.test(requestId) ? `"${requestId}"` : JSON.stringify(requestId);
    const { bytes, infoAt } = statusWithRequestId(shape, requestId);
    const body = Buffer.from(
      `${shape.jsonHead}${id}${shape.jsonDebugTail},"value":"${base64Raw(bytes.subarray(infoAt))}"}],"request_id":${id}}`,
    );
    const header = this.headers();
    header["content-type"] = "application/json";
    header["content-length"] = body.byteLength;
    return { header, body };
  }

  grpcTrailers(): OutgoingHttpHeaders {
    const { shape } = this;
    const trailer = this.headers();
    trailer["grpc-status"] = String(shape.code);
    trailer["grpc-message"] = shape.grpcMessage;
    trailer["grpc-status-details-bin"] = base64Raw(statusWithRequestId(shape, this.requestId).bytes);
    return trailer;
  }

  /**
   * A new object with the error's headers and the collected ones. Copied key by key: a copy
   * made by spreading, then added to, is far slower here (V8 gives the spread copy no room
   * to grow).
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
 * The google.rpc.Status of a refusal, in one buffer:
 * `Status { code, message, details: [Any { type_url, value: ErrorInfo { reason, domain,
 * metadata…, metadata["request_id"] } }] }`, the shape's constant parts followed by the
 * per-call ones (each a tag, a varint length and the bytes). The ErrorInfo is the buffer's
 * end, from `infoAt`: the Connect protocol's detail "value".
 */
function statusWithRequestId(shape: Shape, requestId: string): { bytes: Buffer; infoAt: number } {
  const idLength = Buffer.byteLength(requestId);
  const entryLength = REQUEST_ID_KEY_FIELD.length + ENTRY_VALUE_TAG.length + varintSize(idLength) + idLength;
  const infoLength = shape.info.length + INFO_METADATA_TAG.length + varintSize(entryLength) + entryLength;
  const anyLength = ANY_TYPE_URL_FIELD.length + ANY_VALUE_TAG.length + varintSize(infoLength) + infoLength;
  const out = Buffer.allocUnsafe(
    shape.status.length + STATUS_DETAILS_TAG.length + varintSize(anyLength) + anyLength,
  );
  let at = shape.status.copy(out, 0);
  at += STATUS_DETAILS_TAG.copy(out, at);
  at = writeVarint(out, at, anyLength);
  at += ANY_TYPE_URL_FIELD.copy(out, at);
  at += ANY_VALUE_TAG.copy(out, at);
  at = writeVarint(out, at, infoLength);
  const infoAt = at;
  at += shape.info.copy(out, at);
  at += INFO_METADATA_TAG.copy(out, at);
  at = writeVarint(out, at, entryLength);
  at += REQUEST_ID_KEY_FIELD.copy(out, at);
  at += ENTRY_VALUE_TAG.copy(out, at);
  at = writeVarint(out, at, idLength);
  out.write(requestId, at);
  return { bytes: out, infoAt };
}

/** Bytes of `n`'s varint encoding. */
function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n >>>= 7;
    size++;
  }
  return size;
}

/** Write `n` as a varint at `at`; returns the offset after it. */
function writeVarint(out: Buffer, at: number, n: number): number {
  while (n >= 0x80) {
    out[at++] = (n & 0x7f) | 0x80;
    n >>>= 7;
  }
  out[at++] = n;
  return at;
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
