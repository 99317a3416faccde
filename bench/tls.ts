import { readFileSync } from "node:fs";
import type http2 from "node:http2";
import { join } from "node:path";

/**
 * The TLS and HTTP/2 setup of the reference servers (raw ceiling, bare Connect), kept
 * identical to what src/server.ts gives Tessera: the same development certificates,
 * mTLS "optional" (a client certificate is requested, not required), HTTP/1.1 allowed,
 * TLS 1.2 minimum, and the same HTTP/2 settings. Only the request handling differs.
 */
export function referenceServerOptions(certDir: string): http2.SecureServerOptions {
  return {
    ca: readFileSync(join(certDir, "ca.crt")),
    cert: readFileSync(join(certDir, "server.crt")),
    key: readFileSync(join(certDir, "server.key")),
    allowHTTP1: true,
    requestCert: true,
    rejectUnauthorized: false,
    minVersion: "TLSv1.2",
    settings: { maxConcurrentStreams: 256, maxHeaderListSize: 32 * 1024 },
  };
}

/** Listen on 127.0.0.1 (port from BENCH_PORT, default 0) and announce the port on stdout as one JSON line. */
export function listenAndAnnounce(server: http2.Http2SecureServer): void {
  server.listen(benchPort(), "127.0.0.1", () => {
    const address = server.address();
    announceListening(typeof address === "object" && address ? address.port : benchPort());
  });
  stopOnSignal(() => server.close(() => process.exit(0)));
}

/** The port a bench server listens on: BENCH_PORT, default 0 (a free one). */
export function benchPort(): number {
  return Number(process.env.BENCH_PORT ?? 0);
}

/** The line the bench waits for (bench/run.ts): `{"listening":<port>}`. */
export function announceListening(port: number): void {
  process.stdout.write(`${JSON.stringify({ listening: port })}\n`);
}

/** Run `stop` on SIGTERM or SIGINT (the bench stops its servers with SIGTERM). */
export function stopOnSignal(stop: () => void): void {
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
