import { DEFAULT_PORT } from "./credentials.js";
import { ClientConfigError } from "./errors.js";
import { type ClientTls, loadClientTls } from "./tls.js";
import type { UserAPIOptions } from "./user-api-core.js";

// The checks and the TLS material of a client's connection, apart from the client (the
// Connect and protobuf runtimes): UserAPICore starts with them, and so does the CLI's
// whoami, which makes its one call without those runtimes (src/cli/actions/whoami.ts).

const TOKEN_RE = /^[\x21-\x7e]+$/;

/**
 * The largest answer a client reads by default (one message, decompressed; the option
 * `readMaxBytes`, and the CLI's bound): Tessera's largest, a page
 * of 200 audit events, is well under 1 MiB. connect-node's default is 4 GiB, so a server
 * the client was pointed at (or a gzip bomb of a few kilobytes from it) could have it
 * buffer gigabytes.
 */
export const MAX_ANSWER_BYTES = 16 * 1024 * 1024;

/** Refuse a token that could not be sent as a header value (without echoing it). */
export function assertTokenShape(token: string, what: string): void {
  if (!TOKEN_RE.test(token))
    throw new ClientConfigError(`${what} contains whitespace or non-printable characters`);
}

/** Where and how a client connects, checked. */
export interface Connection {
  host: string;
  port: number;
  protocol: "grpc" | "connect";
  /** `https://host:port` (`http://` for plaintext); an IPv6 host in brackets. */
  baseUrl: string;
  /** Node `tls.connect` options: CA, client certificate and key, `rejectUnauthorized` when told. */
  tls: ClientTls & { rejectUnauthorized?: false };
}

/**
 * Check `options` as a client is built ({@link ClientConfigError} for the first problem:
 * host, port, protocol, token shapes, Basic credentials, `readMaxBytes`, an unconfirmed `verifySsl: false`,
 * the TLS files) and load the TLS material.
 */
export function connectionOf(options: UserAPIOptions): Connection {
  const host = options.host ?? "localhost";
  const port = options.port ?? DEFAULT_PORT;
  const protocol = options.protocol ?? "grpc";
  if (!host || /[\s/]/.test(host)) throw new ClientConfigError(`invalid host "${host}"`);
  if (!Number.isInteger(port) || port < 1 || port > 65535)
    throw new ClientConfigError(`invalid port ${port}`);
  if (protocol !== "grpc" && protocol !== "connect") {
    throw new ClientConfigError(`invalid protocol "${String(protocol)}": use "grpc" or "connect"`);
  }
  if (options.token !== undefined) assertTokenShape(options.token, "token");
  if (options.refreshToken !== undefined) assertTokenShape(options.refreshToken, "refresh token");
  if (options.basicAuth && (!options.basicAuth.username || options.basicAuth.username.includes(":"))) {
    throw new ClientConfigError("basicAuth.username must be non-empty and must not contain a colon");
  }
  const max = options.readMaxBytes;
  // connect-node's own ceiling: 2^32 - 1, the most its length prefix can say.
  if (max !== undefined && (!Number.isInteger(max) || max < 1 || max > 0xffffffff))
    throw new ClientConfigError(`invalid readMaxBytes ${max}: a positive whole number of bytes`);
  if (options.verifySsl === false && options.insecure !== true) {
    throw new ClientConfigError(
      "verifySsl: false accepts any server certificate and exposes the token to whoever answers; " +
        "set insecure: true as well to allow it (development only), or give the server's CA with certFolder or caFile",
    );
  }
  const tls = options.plaintext
    ? {}
    : {
        ...loadClientTls({ certFolder: options.certFolder, caFile: options.caFile }),
        ...(options.verifySsl === false ? { rejectUnauthorized: false as const } : {}),
      };
  const hostPart = host.includes(":") ? `[${host}]` : host;
  const baseUrl = `${options.plaintext ? "http" : "https"}://${hostPart}:${port}`;
  return { host, port, protocol, baseUrl, tls };
}
