// The protected service's own connection to Tessera: VerifyCredential and WatchRevocations
// over one transport, with the service's credential.
import { isIP } from "node:net";
import { type Client, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  VerificationService,
  type VerifyCredentialResponse,
} from "../../../gen/tessera/v1/verification_service_pb.js";
import { GuardedSessionManager, retryRefusedStream } from "../refused-stream.js";
import type { ClientTls } from "../tls.js";
import type { OpenWatch } from "./revocation-watch.js";
import { unavailable } from "./verdicts.js";

/** What the core asks of Tessera. */
export interface TesseraClient {
  /**
   * VerifyCredential for `credential`, naming the address of the client that presented it
   * when known (Tessera then budgets that client's failures apart from the others'), and
   * the watch's position (`min_revocation_position`; "" for none).
   * @throws TesseraAuthError UNAVAILABLE whatever went wrong on the way
   */
  verify(
    credential: string,
    clientAddress: string | undefined,
    minRevocationPosition?: string,
  ): Promise<VerifyCredentialResponse>;
  openWatch: OpenWatch;
}

/** Build the connection: `transport`, else gRPC over HTTP/2 and TLS to `base`. */
export function createTesseraClient(options: {
  base: string;
  tls: ClientTls;
  transport?: Transport | undefined;
  credential?: string | undefined;
  verifyTimeoutMs: number;
  /** Told of each VerifyCredential call that failed (the call is then refused with 503). */
  onFault?: ((err: unknown) => void) | undefined;
}): TesseraClient {
  const { tls, verifyTimeoutMs } = options;
  const transport =
    options.transport ??
    createGrpcTransport({
      baseUrl: options.base,
      // A call crossing Tessera's GOAWAY (a recycled connection) is refused, and safe to retry.
      interceptors: [retryRefusedStream],
      // Guarded: a server's GOAWAY to an idle connection cannot throw in the application.
      sessionManager: new GuardedSessionManager(
        options.base,
        {},
        {
          ...(tls.ca ? { ca: tls.ca } : {}),
          ...(tls.cert ? { cert: tls.cert, key: tls.key } : {}),
        },
      ),
    });
  const headers: Record<string, string> = {};
  if (options.credential)
    headers.authorization = /^basic /i.test(options.credential)
      ? options.credential
      : `Bearer ${options.credential}`;
  const client: Client<typeof VerificationService> = createClient(VerificationService, transport);
  return {
    async verify(credential, clientAddress, minRevocationPosition = "") {
      try {
        return await client.verifyCredential(
          { credential, clientAddress: sendable(clientAddress), minRevocationPosition },
          { headers, timeoutMs: verifyTimeoutMs },
        );
      } catch (err) {
        // Whatever went wrong between this service and Tessera (unreachable, overloaded, this
        // service's own credential refused), the caller's credential is not known good.
        options.onFault?.(err);
        const retry = err instanceof ConnectError ? Number(err.metadata.get("retry-after")) : Number.NaN;
        throw unavailable("Tessera cannot verify credentials now", err, retry > 0 ? Math.min(retry, 60) : 1);
      }
    },
    openWatch: (cursor, signal) => client.watchRevocations({ cursor }, { signal, headers }),
  };
}

/**
 * The address as sent: an IP literal Tessera takes, else none (Tessera refuses anything
 * else as INVALID_ARGUMENT, which would refuse the call rather than only lose the budget).
 */
function sendable(address: string | undefined): string {
  return address !== undefined && address.length <= 64 && isIP(address) !== 0 ? address : "";
}
