/**
 * Unary RPCs over Connect (POST), gRPC and gRPC-Web without Connect's streaming pipeline.
 *
 * Why this is written here: @connectrpc/connect serves a unary call over gRPC and gRPC-Web
 * through the same chain of async generators as a bidirectional stream (prepend, split,
 * decompress, parse, invoke, serialize, compress, join, catch: ten generators and the
 * promises between them for one message each way). Profiled under load, that chain and
 * the garbage it leaves cost more than half of a unary gRPC call (about 2.3× the same
 * call over Connect JSON). Its Connect unary handler is direct, but ends every call with
 * `abort()` on the context's AbortController, which builds a DOMException with a captured
 * stack trace. No option of the library changes either, and no other library serves
 * these protocols on Connect's router.
 *
 * What is hand-written is the control flow of a unary call, the same for every protocol
 * (read one message, invoke, write one message), and the handler context with the call of
 * the interceptors and the implementation, whose signal and headers are made only when
 * read (see `UnaryCall`). Every protocol detail is Connect's own exported code, called as
 * its handlers call it: content types, timeouts, compression negotiation, envelopes,
 * (de)serialization with its size limits, error JSON, HTTP status mapping, gRPC
 * trailers. Error messages and codes are those of Connect's handlers, and
 * test/unary-handlers.test.ts compares the two byte for byte, over every protocol, for
 * successes and for each kind of failure. Streaming calls, Connect GET and gRPC-Web text
 * stay with Connect.
 *
 * This file makes a method's handlers, one per protocol, when the routes are built: the
 * handlers themselves are unary-call.ts (a call from its body to its answer, interceptors
 * and implementation included), over call-context.ts (the handler context) and
 * unary-core.ts (the types, the request headers read, the error of a failed call, envelopes).
 */
import { create, type DescMessage, type MessageShape, toJsonString } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  createMethodSerializationLookup,
  limitSerialization,
  type Serialization,
  type UniversalHandlerOptions,
  validateUniversalHandlerOptions,
} from "@connectrpc/connect/protocol";
import { rememberFrozenAnswers } from "./frozen-answers.js";
import { connectUnary, grpcUnary } from "./unary-call.js";
import type {
  CallErrorHook,
  HandlerOptions,
  Lookup,
  UnaryHandler,
  UnaryProtocol,
  UnarySpec,
} from "./unary-core.js";

export {
  type CallErrorHook,
  nodeHeaders,
  type RequestHeaders,
  type UnaryAnswer,
  type UnaryHandler,
  type UnaryProtocol,
  type UnaryRequest,
} from "./unary-core.js";

/**
 * The unary handlers for one method, by protocol, for the router options `options`
 * (Connect's own, as given to its router); a protocol the options switch off has none.
 * Connect unary calls that must carry `Connect-Protocol-Version`
 * (`requireConnectProtocolHeader`) are left to Connect as well.
 */
export function createUnaryHandlers(
  options: Partial<UniversalHandlerOptions> & {
    connect?: boolean;
    grpc?: boolean;
    grpcWeb?: boolean;
    callError?: CallErrorHook;
  },
  spec: UnarySpec,
): Partial<Record<UnaryProtocol, UnaryHandler>> {
  const opt: HandlerOptions = { ...validateUniversalHandlerOptions(options), callError: options.callError };
  const serialization = clientFaultParsing(
    rememberFrozenAnswers(
      plainJsonAnswers(
        createMethodSerializationLookup(spec.method, opt.binaryOptions, opt.jsonOptions, opt),
        spec.method.output,
        opt,
      ),
    ),
    spec.method.input,
  );
  const handlers: Partial<Record<UnaryProtocol, UnaryHandler>> = {};
  if (options.connect !== false && !opt.requireConnectProtocolHeader)
    handlers.connect = connectUnary(opt, spec, serialization);
  if (options.grpc !== false) handlers.grpc = grpcUnary(opt, spec, serialization, false);
  if (options.grpcWeb !== false) handlers["grpc-web"] = grpcUnary(opt, spec, serialization, true);
  return handlers;
}

/**
 * The lookup with request parsing whose failures are the client's: Connect reports a
 * malformed binary message as Internal ("parse binary: …", while malformed JSON is
 * InvalidArgument), so a client sending garbage was answered with a server fault. Request
 * bytes that do not parse are InvalidArgument, with Connect's message; serializing the
 * response is untouched (a failure there is ours).
 */
function clientFaultParsing(lookup: Lookup, input: DescMessage): Lookup {
  const wrap = (
    s: Serialization<MessageShape<DescMessage>>,
    json: boolean,
  ): Serialization<MessageShape<DescMessage>> => {
    // Not for a well-known type, whose JSON is its own ("{}" is a Struct in a Value).
    const emptyJson = json && !input.typeName.startsWith("google.protobuf.");
    return {
      serialize: s.serialize,
      parse(data) {
        // "{}", the JSON of a request without fields (GetCurrentUser) as clients send it: the
        // empty message JSON parsing makes, without its text, maps and sets (a Connect JSON
        // call's heap allocation dropped by a kilobyte).
        if (emptyJson && data.byteLength === 2 && data[0] === 0x7b && data[1] === 0x7d) return create(input);
        try {
          return s.parse(data);
        } catch (e) {
          if (e instanceof ConnectError && e.code === Code.Internal)
            throw new ConnectError(e.rawMessage, Code.InvalidArgument, undefined, undefined, e);
          throw e;
        }
      },
    };
  };
  const binary = wrap(lookup.getI(true), false);
  const json = wrap(lookup.getI(false), true);
  return { getI: (useBinary) => (useBinary ? binary : json), getO: lookup.getO };
}

/**
 * The lookup with the JSON answer made as Connect's serializer makes it, with less garbage,
 * when no JSON option is set (Tessera sets none): Connect passes its options object to
 * `toJsonString`, which then copies it with protobuf-es's defaults on every call, and encodes
 * through TextEncoder (a new ArrayBuffer per answer), where `Buffer.from` takes a slice of
 * Node's pool. Same bytes (UTF-8 either way), same errors and the same `writeMaxBytes` check.
 */
function plainJsonAnswers(lookup: Lookup, output: DescMessage, opt: HandlerOptions): Lookup {
  if (opt.jsonOptions !== undefined && Object.keys(opt.jsonOptions).length > 0) return lookup;
  const json = limitSerialization<MessageShape<DescMessage>>(
    {
      parse: lookup.getO(false).parse,
      serialize(data) {
        try {
          return Buffer.from(toJsonString(output, data));
        } catch (e) {
          throw ConnectError.from(e, Code.Internal);
        }
      },
    },
    opt,
  );
  return { getI: lookup.getI, getO: (useBinary) => (useBinary ? lookup.getO(true) : json) };
}
