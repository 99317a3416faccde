// The metrics endpoint: plain HTTP on its own address, apart from the public port, because
// what it tells (method mix, failure rates, pool state) is for operators.
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { Logger } from "pino";
import { parseListen } from "../config.js";
import { listenError } from "../listen-check.js";
import type { Metrics } from "../metrics.js";

/** A listening metrics endpoint. */
export interface MetricsServer {
  /** e.g. http://127.0.0.1:9464/metrics */
  url: string;
  close(): Promise<void>;
}

/** Whether a `metrics.listen` value turns the endpoint off. */
export function metricsOff(listen: string): boolean {
  return listen === "" || listen === "off";
}

/**
 * Serve `GET /metrics` (plain HTTP) on `listen` (`host:port`; port 0 picks one), apart from
 * the public port: what it tells (method mix, failure rates, pool state) is for operators.
 * Anything else is 404. A scrape never fails the process: a collector that throws answers 500.
 * @throws Error (one line naming the address) when it cannot listen
 */
export async function startMetricsServer(
  metrics: Metrics,
  listen: string,
  logger: Logger,
): Promise<MetricsServer> {
  const at = parseListen(listen);
  if (at === null) throw new Error(`metrics.listen: not host:port: ${listen}`);
  metrics.collectProcessMetrics();
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (path !== "/metrics" || (req.method !== "GET" && req.method !== "HEAD")) {
      res.statusCode = path === "/metrics" ? 405 : 404;
      res.end();
      return;
    }
    metrics.scrape().then(
      (text) => {
        res.statusCode = 200;
        res.setHeader("content-type", metrics.registry.contentType);
        res.setHeader("cache-control", "no-store");
        res.end(req.method === "HEAD" ? undefined : text);
      },
      (err: unknown) => {
        logger.error({ err: err instanceof Error ? err.message : String(err) }, "metrics scrape failed");
        res.statusCode = 500;
        res.end();
      },
    );
  });
  // Scrapers keep connections open; none of them may hold the process at shutdown.
  server.keepAliveTimeout = 5000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err) => reject(listenError(err, at)));
    server.listen(at.port, at.host, () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  const host = at.host.includes(":") ? `[${at.host}]` : at.host;
  return {
    url: `http://${host}:${port}/metrics`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
