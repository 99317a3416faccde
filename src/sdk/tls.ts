import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { errnoWords } from "./errno.js";
import { ClientConfigError } from "./errors.js";

/** TLS material for the client's HTTP/2 connection (Node `tls.connect` options). */
export interface ClientTls {
  /** CA certificate(s) to verify the server with; undefined means the system roots. */
  ca?: Buffer;
  /** Client certificate and key for mutual TLS. */
  cert?: Buffer;
  key?: Buffer;
}

function readPem(path: string, what: string, marker: RegExp): Buffer {
  let data: Buffer;
  try {
    data = readFileSync(path);
  } catch (err) {
    const why = errnoWords(err) ?? (err as NodeJS.ErrnoException).code ?? (err as Error).message;
    throw new ClientConfigError(`cannot read ${what} ${path}: ${why}`, { path, cause: err });
  }
  if (!marker.test(data.toString("latin1"))) {
    throw new ClientConfigError(`${what} ${path} is not PEM (no "-----BEGIN" block of the expected kind)`, {
      path,
    });
  }
  return data;
}

const CERT = /-----BEGIN CERTIFICATE-----/;
const KEY = /-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----/;

/**
 * Load the client's TLS files. A cert folder must hold `ca.crt` (to verify the server);
 * `client.crt` + `client.key`, when present, are presented for mutual TLS (one without
 * the other is an error). `caFile` names a CA bundle explicitly and wins over the
 * folder's `ca.crt`. Without either the system roots verify the server. Every problem
 * is a {@link ClientConfigError} naming the file.
 */
export function loadClientTls(options: {
  certFolder?: string | undefined;
  caFile?: string | undefined;
}): ClientTls {
  const tls: ClientTls = {};
  if (options.certFolder) {
    const folder = options.certFolder;
    if (!existsSync(folder))
      throw new ClientConfigError(`cert folder ${folder} does not exist`, { path: folder });
    if (!options.caFile) tls.ca = readPem(join(folder, "ca.crt"), "CA certificate", CERT);
    const certPath = join(folder, "client.crt");
    const keyPath = join(folder, "client.key");
    const hasCert = existsSync(certPath);
    const hasKey = existsSync(keyPath);
    if (hasCert !== hasKey) {
      const missing = hasCert ? keyPath : certPath;
      throw new ClientConfigError(
        `cannot read ${hasCert ? "client key" : "client certificate"} ${missing}: no such file (mutual TLS needs both client.crt and client.key)`,
        {
          path: missing,
        },
      );
    }
    if (hasCert) {
      tls.cert = readPem(certPath, "client certificate", CERT);
      tls.key = readPem(keyPath, "client key", KEY);
    }
  }
  if (options.caFile) tls.ca = readPem(options.caFile, "CA file", CERT);
  return tls;
}
