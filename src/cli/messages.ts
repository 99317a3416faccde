// The protobuf helpers of the client commands that print messages (every command group but
// the session one): apart from output.ts so that printing loads no protobuf runtime.

import { type DescMessage, type MessageShape, toJson } from "@bufbuild/protobuf";
import { type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";

/** A protobuf message as JSON (camelCase, RFC 3339 timestamps, every field present). */
export function messageJson<D extends DescMessage>(
  schema: D,
  message: MessageShape<D>,
): Record<string, unknown> {
  return toJson(schema, message, { alwaysEmitImplicit: true }) as Record<string, unknown>;
}

/** A timestamp for a table cell ("-" when unset). */
export function when(t: Timestamp | undefined): string {
  return t
    ? timestampDate(t)
        .toISOString()
        .replace(/\.\d{3}Z$/, "Z")
    : "-";
}
