import type { DescService } from "@bufbuild/protobuf";
import { type Client, createClient, type Transport } from "@connectrpc/connect";
import { toClientError } from "./error-mapping.js";

/**
 * A Connect client for `service` whose every failure is a typed
 * {@link TesseraClientError} (via {@link toClientError}). The mapping wraps the client
 * rather than sitting in an interceptor because connect-es re-wraps whatever an
 * interceptor throws that is not its own ConnectError.
 */
export function typedClient<S extends DescService>(
  service: S,
  transport: Transport,
  secrets: () => readonly (string | undefined)[],
): Client<S> {
  const raw = createClient(service, transport) as unknown as Record<string, (...args: unknown[]) => unknown>;
  const out: Record<string, unknown> = {};
  for (const method of service.methods) {
    const call = raw[method.localName]!;
    if (method.methodKind === "unary" || method.methodKind === "client_streaming") {
      out[method.localName] = async (...args: unknown[]) => {
        try {
          return await call(...args);
        } catch (err) {
          throw toClientError(err, secrets());
        }
      };
    } else {
      out[method.localName] = (...args: unknown[]) =>
        mapIterable(call(...args) as AsyncIterable<unknown>, secrets);
    }
  }
  return out as Client<S>;
}

async function* mapIterable<T>(
  source: AsyncIterable<T>,
  secrets: () => readonly (string | undefined)[],
): AsyncIterable<T> {
  try {
    yield* source;
  } catch (err) {
    throw toClientError(err, secrets());
  }
}
