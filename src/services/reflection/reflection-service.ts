import { createRegistry, type DescFile, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { ServerReflection as ReflectionV1 } from "../../../gen/grpc/reflection/v1/reflection_pb.js";
import type { ServerReflection as ReflectionV1Alpha } from "../../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { boundedMessages, type StreamMessageBounds } from "../stream-messages.js";

/**
 * gRPC server reflection (v1 and v1alpha, which older tools ask for) over the
 * protobuf-es registry: no connect-node package serves it, and the registry already
 * holds every file's FileDescriptorProto. Answers carry a file and its transitive
 * dependencies, as grpcurl and buf curl expect.
 */
export function createReflectionServices(
  files: readonly DescFile[],
  serviceNames: readonly string[],
  bounds: StreamMessageBounds,
) {
  const byName = new Map<string, DescFile>();
  const collect = (f: DescFile) => {
    if (byName.has(f.proto.name)) return;
    byName.set(f.proto.name, f);
    for (const d of f.dependencies) collect(d);
  };
  for (const f of files) collect(f);
  const registry = createRegistry(...byName.values());
  const encoded = new Map<DescFile, Uint8Array>();
  const encode = (file: DescFile) => {
    let bytes = encoded.get(file);
    if (!bytes) {
      bytes = toBinary(FileDescriptorProtoSchema, file.proto);
      encoded.set(file, bytes);
    }
    return bytes;
  };
  const withDeps = (file: DescFile): Uint8Array[] => {
    const seen = new Set<DescFile>();
    const visit = (f: DescFile) => {
      if (seen.has(f)) return;
      seen.add(f);
      for (const d of f.dependencies) visit(d);
    };
    visit(file);
    return [...seen].map(encode);
  };
  const fileOfSymbol = (symbol: string): DescFile | undefined => {
    const desc = registry.get(symbol);
    if (desc) return desc.file;
    // A method name: "pkg.Service.Method".
    const dot = symbol.lastIndexOf(".");
    const parent = dot > 0 ? registry.getService(symbol.slice(0, dot)) : undefined;
    return parent?.methods.some((m) => m.name === symbol.slice(dot + 1)) ? parent.file : undefined;
  };

  type Req = { host: string; messageRequest: { case: string | undefined; value?: unknown } };
  // biome-ignore lint/suspicious/noExplicitAny: v1 and v1alpha share one wire shape; the response init is built untyped.
  const answer = (req: Req): any => {
    const base = { validHost: req.host, originalRequest: req };
    const r = req.messageRequest;
    const notFound = (what: string) => ({
      ...base,
      messageResponse: { case: "errorResponse", value: { errorCode: 5, errorMessage: `${what} not found` } },
    });
    /** The file (with every file it depends on) when there is one, else NOT_FOUND for `what`. */
    const fileResponse = (file: DescFile | undefined, what: string) =>
      file
        ? {
            ...base,
            messageResponse: {
              case: "fileDescriptorResponse",
              value: { fileDescriptorProto: withDeps(file) },
            },
          }
        : notFound(what);
    switch (r.case) {
      case "listServices":
        return {
          ...base,
          messageResponse: {
            case: "listServicesResponse",
            value: { service: serviceNames.map((name) => ({ name })) },
          },
        };
      case "fileByFilename":
        return fileResponse(byName.get(r.value as string), `file ${String(r.value)}`);
      case "fileContainingSymbol":
        return fileResponse(fileOfSymbol(r.value as string), `symbol ${String(r.value)}`);
      case "fileContainingExtension": {
        const v = r.value as { containingType: string; extensionNumber: number };
        const message = registry.getMessage(v.containingType);
        const ext = message ? registry.getExtensionFor(message, v.extensionNumber) : undefined;
        return fileResponse(ext?.file, "extension");
      }
      case "allExtensionNumbersOfType": {
        const typeName = r.value as string;
        const numbers: number[] = [];
        for (const d of registry)
          if (d.kind === "extension" && d.extendee.typeName === typeName) numbers.push(d.number);
        return {
          ...base,
          messageResponse: {
            case: "allExtensionNumbersResponse",
            value: { baseTypeName: typeName, extensionNumber: numbers },
          },
        };
      }
      default:
        return {
          ...base,
          messageResponse: {
            case: "errorResponse",
            value: { errorCode: 12, errorMessage: "unsupported request" },
          },
        };
    }
  };
  async function* serve(requests: AsyncIterable<Req>, context: HandlerContext) {
    for await (const req of boundedMessages(clientFaults(requests), context, bounds)) yield answer(req);
  }
  const v1: ServiceImpl<typeof ReflectionV1> = {
    serverReflectionInfo: (reqs, context) => serve(reqs as AsyncIterable<Req>, context),
  };
  const v1alpha: ServiceImpl<typeof ReflectionV1Alpha> = {
    serverReflectionInfo: (reqs, context) => serve(reqs as AsyncIterable<Req>, context),
  };
  return { v1, v1alpha };
}

/**
 * The request messages of a stream, with a failure to read one answered as the client's
 * fault. Connect's stream parser raises a message that does not decode (malformed
 * protobuf or JSON) as Internal; everything that can fail while reading the request comes
 * from what the client sent, so Internal there becomes InvalidArgument (other codes, such
 * as ResourceExhausted for a message over the size limit, stay).
 */
async function* clientFaults<T>(messages: AsyncIterable<T>): AsyncGenerator<T> {
  const it = messages[Symbol.asyncIterator]();
  for (;;) {
    let next: IteratorResult<T>;
    try {
      next = await it.next();
    } catch (err) {
      const ce = ConnectError.from(err);
      if (ce.code !== Code.Internal) throw ce;
      throw new ConnectError("malformed request message", Code.InvalidArgument, undefined, undefined, err);
    }
    if (next.done) return;
    yield next.value;
  }
}
