/**
 * Answers that never change, encoded once per protocol encoding rather than once per call.
 *
 * Why: an implementation may hand out the same answer object to many calls (GetCurrentUser's
 * is made once per frozen principal and user row, services/user/current-user.ts), and then
 * encoding it again on every call is the same work for the same bytes: protobuf-es's binary
 * writer and its JSON (timestamps included) were a measurable share of such a call
 * (bench/results/2026-12-06-serialize.md). An answer made by {@link frozenAnswer} is frozen
 * to its last field, so its encoding is a pure function of the object: each handler's
 * serialization keeps the bytes per object (a WeakMap: they go when the answer does). Any
 * other answer is encoded on every call, as before.
 */
import { create, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import type { Serialization } from "@connectrpc/connect/protocol";
import type { Lookup } from "./unary-core.js";

/** The answers {@link frozenAnswer} made: deeply frozen, so encoded once per serialization. */
const frozen = new WeakSet<object>();

/**
 * The message of `schema` made from `init`, frozen with every message and list in it, and
 * known to the unary handlers as one whose encoding may be kept. A message holding bytes
 * (a typed array cannot be frozen) is returned frozen as far as it goes, but not known: it
 * is encoded per call.
 */
export function frozenAnswer<Desc extends DescMessage>(
  schema: Desc,
  init: MessageInitShape<Desc>,
): MessageShape<Desc> {
  const message = create(schema, init);
  if (freezeDeeply(message)) frozen.add(message);
  return message;
}

/** Freeze `value` and everything in it; false when something in it cannot be frozen (bytes). */
function freezeDeeply(value: object): boolean {
  if (ArrayBuffer.isView(value)) return value.byteLength === 0;
  let whole = true;
  for (const key of Object.keys(value)) {
    const field = (value as Record<string, unknown>)[key];
    if (field !== null && typeof field === "object" && !freezeDeeply(field)) whole = false;
  }
  Object.freeze(value);
  return whole;
}

/** The lookup whose answer serializations keep the bytes of every {@link frozenAnswer}. */
export function rememberFrozenAnswers(lookup: Lookup): Lookup {
  const binary = remembering(lookup.getO(true));
  const json = remembering(lookup.getO(false));
  return { getI: lookup.getI, getO: (useBinary) => (useBinary ? binary : json) };
}

type AnyMessage = MessageShape<DescMessage>;

function remembering(s: Serialization<AnyMessage>): Serialization<AnyMessage> {
  const encoded = new WeakMap<object, Uint8Array<ArrayBuffer>>();
  return {
    parse: s.parse,
    serialize(message) {
      const known = encoded.get(message);
      if (known !== undefined) return known;
      // Encoded (and checked against the size limit) as any answer; kept only once it passed.
      const bytes = s.serialize(message);
      if (!frozen.has(message)) return bytes;
      // A buffer of its own: a slice of Node's pool (JSON's Buffer.from) would keep the
      // whole pool slab alive for as long as the answer is kept.
      const own =
        bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength
          ? bytes
          : new Uint8Array(bytes);
      encoded.set(message, own);
      return own;
    },
  };
}
