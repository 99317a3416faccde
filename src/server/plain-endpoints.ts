import type { App } from "../app.js";
import type { NodeResponse as Response } from "../transport/stream-server.js";
import { VERSION } from "../version.js";

/**
 * The plain HTTP endpoints, answered by the request handler itself (GET or HEAD): /health
 * (the process is up), /ready (it can serve: its database answers, and it is not draining)
 * and /.well-known/jwks.json (the public signing keys).
 */
export const PLAIN_PATHS = new Set(["/health", "/ready", "/.well-known/jwks.json"]);

function json(res: Response, status: number, body: unknown, cacheControl = "no-store") {
  const text = JSON.stringify(body);
  res.statusCode = status;
  res.setHeader("content-type", "application/json");
  res.setHeader("cache-control", cacheControl);
  // As every RPC's Unavailable: a client or balancer polling /ready is told when to come back.
  if (status === 503) res.setHeader("retry-after", "1");
  res.end(text);
}

/**
 * With `rateLimit.redisUrl`, whether the limits are shared through Redis now. Told, not a
 * 503: with Redis away the limits count per instance (documented), and every instance of a
 * fleet failing /ready at once would turn a Redis outage into the service's.
 */
function redisOf(app: App): { redis?: "up" | "down" } {
  const shared = app.limits?.shared();
  return shared === undefined ? {} : { redis: shared ? "up" : "down" };
}

/**
 * The answerer of the {@link PLAIN_PATHS}: `draining` tells whether the server is shutting
 * down (/ready then answers 503 whatever the database says).
 */
export function createPlainEndpoints(
  app: App,
  draining: (() => boolean) | undefined,
): (path: string, res: Response, requestId: string) => void {
  // /ready is public and not rate limited (probes must pass): each request's own `select 1`
  // let anonymous callers fill the database pool and starve every call that needs it.
  // Requests arriving while a ping is out share it: at most one at a time.
  let pinging: Promise<boolean> | undefined;
  const ping = (): Promise<boolean> =>
    (pinging ??= app.storage.ping().finally(() => {
      pinging = undefined;
    }));
  return function servePlain(path, res, requestId) {
    if (path === "/health") {
      json(res, 200, {
        ok: true,
        data: {
          status: "healthy",
          version: VERSION,
          uptime: Math.floor((Date.now() - app.startedAt) / 1000),
        },
      });
      return;
    }
    if (path === "/ready") {
      if (draining?.()) {
        // Shutting down: a load balancer stops sending new work while calls already sent
        // (and new ones on open connections, until the listener closes) still complete.
        json(res, 503, {
          ok: false,
          error: "Service Unavailable",
          code: "UNAVAILABLE",
          message: "draining: shutting down",
          request_id: requestId,
        });
        return;
      }
      ping().then(
        (up) =>
          up
            ? json(res, 200, { ok: true, data: { status: "ready", database: "up", ...redisOf(app) } })
            : json(res, 503, {
                ok: false,
                error: "Service Unavailable",
                code: "UNAVAILABLE",
                message: "database unavailable",
                request_id: requestId,
              }),
        () =>
          json(res, 503, {
            ok: false,
            error: "Service Unavailable",
            code: "UNAVAILABLE",
            message: "database unavailable",
            request_id: requestId,
          }),
      );
      return;
    }
    if (path === "/.well-known/jwks.json") {
      // Short cache: verifiers pick up a rotated key within minutes.
      json(res, 200, app.jwt.jwks(), "public, max-age=300");
      return;
    }
  };
}
