// What operators read: the audit trail's buffering and retention, logging, and the metrics
// endpoint.
import { z } from "zod";
import { parseListen } from "./addresses.js";
import { configKeys } from "./key-docs.js";

/** `audit.*`: the write buffer and how long events are kept. */
export const auditSchema = z
  .object({
    bufferSize: z.number().int().positive().default(100_000).register(configKeys, {
      env: "TESSERA_AUDIT_BUFFER_SIZE",
      description:
        "Audit events (and, apart, credentials' last-used times) kept in memory while they wait to be written, e.g. through a database outage (retried with backoff). Past it new events are dropped, counted and logged once per overflow.",
    }),
    retentionDays: z.number().int().min(0).default(90).register(configKeys, {
      env: "TESSERA_AUDIT_RETENTION_DAYS",
      description:
        "Days audit events are kept; older ones are deleted in batches every hour. 0 keeps them forever.",
    }),
  })
  .strict()
  .prefault({});

/** `log.*`: the log level and the access log. */
export const logSchema = z
  .object({
    level: z
      .enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"])
      .default("info")
      .register(configKeys, {
        env: "TESSERA_LOG_LEVEL",
        description:
          "fatal, error, warn, info, debug, trace or silent. Re-read on SIGHUP (config file and environment), so a running server changes level without a restart.",
      }),
    access: z.enum(["info", "debug", "off"]).default("info").register(configKeys, {
      env: "TESSERA_LOG_ACCESS",
      description:
        "Access log: one line per RPC (method, protocol, code, reason, duration, principal, request id, client IP; never a credential) at info or debug level, or off.",
    }),
  })
  .strict()
  .prefault({});

/** `metrics.*`: where the Prometheus endpoint listens. */
export const metricsSchema = z
  .object({
    // Loopback by default: the metrics name methods, principals' counts and the pool's
    // state, which are for operators, not for the callers of the public port.
    listen: z
      .string()
      .refine((v) => v === "" || v === "off" || parseListen(v) !== null, {
        message: 'expected host:port (e.g. 127.0.0.1:9464, [::1]:9464), or "off"',
      })
      .default("127.0.0.1:9464")
      .register(configKeys, {
        env: "TESSERA_METRICS_LISTEN",
        description:
          "host:port of the Prometheus endpoint GET /metrics (plain HTTP, apart from the public port; see docs/metrics.md); off for none. Reachable from loopback only by default.",
      }),
  })
  .strict()
  .prefault({});
