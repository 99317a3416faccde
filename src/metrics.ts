import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { DescMethod } from "@bufbuild/protobuf";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { PasswordShedding } from "./admission/shedding.js";
import type { AuditLog, AuditStats } from "./audit.js";
import { hashPool, observeHashWaits } from "./auth/hash-pool.js";
import type { SecretCacheStats } from "./auth/secret-cache.js";
import { parseListen } from "./config.js";
import { listenError } from "./listen-check.js";
import { accessLogStats } from "./logger.js";
import type { RateLimits } from "./rate-limit.js";
import type { Storage } from "./storage/orm.js";
import type { SqlRunner } from "./storage/sql.js";
import type { UnaryProtocol } from "./transport/unary-protocols.js";
import { VERSION } from "./version.js";

/**
 * Prometheus metrics through prom-client (the registry, the exposition format and Node's
 * default process metrics are its own). Two kinds:
 *
 * - counted on the request path, where nothing else counts: calls (by service, method,
 *   protocol and code, with a latency histogram) and authentication outcomes. Each label
 *   combination's prom-client child is made once and kept, so a call costs two or three
 *   increments; the method label only ever names a registered RPC (the adapter reports
 *   calls to routes it serves, never a path a client made up);
 * - read when scraped (prom-client `collect()` callbacks), from counters the components
 *   keep anyway: rate-limit refusals, the PBKDF2 pool, the state cache, the audit buffer and
 *   the database pool. These cost nothing between scrapes.
 *
 * Every metric name is listed in docs/metrics.md.
 */
export interface Metrics {
  readonly registry: Registry;
  /** One finished call: `code` 0 for OK, else its Connect code; `seconds` from its first byte to its answer. */
  observeCall(method: DescMethod, protocol: UnaryProtocol, code: number, seconds: number): void;
  /**
   * One authentication: `credential` what was presented (a {@link CredentialKind}),
   * `reason` the refusal's stable reason (empty on success).
   */
  observeAuth(credential: CredentialKind, success: boolean, reason: string): void;
  /** The exposition text (Prometheus text format 0.0.4). */
  scrape(): Promise<string>;
  /**
   * Add Node's default process metrics (prom-client `collectDefaultMetrics`), once; the
   * metrics server does when it starts. Not at creation: they start an event-loop delay
   * monitor and a GC observer that are never stopped, one per registry, and an app that
   * serves no metrics (most test apps) need not carry them.
   */
  collectProcessMetrics(): void;
  /** Stop observing process-wide sources (the hash pool). */
  close(): void;
}

/** The credential kinds of `tessera_auth_attempts_total` (a fixed set: label values are never caller input). */
export type CredentialKind =
  | "jwt"
  | "pat"
  | "api_key"
  | "basic"
  | "machine_token"
  | "mtls"
  | "admin_token"
  | "password"
  | "refresh_token"
  | "bearer_unknown"
  | "malformed"
  | "none";

/** What the scrape-time callbacks read. */
export interface MetricsSources {
  sql: Pick<SqlRunner, "cacheStats">;
  audit: Pick<AuditLog, "stats">;
  /** The last-used times' buffer: the same shape of figures as the audit log's. */
  lastUsed?: { stats(): AuditStats };
  limits: RateLimits | undefined;
  storage: Storage;
  /** The verified-secret cache (auth/secret-cache.ts). */
  secrets?: { stats(): SecretCacheStats };
  /** Password checks shed before their body (admission/shedding.ts). */
  shedding?: Pick<PasswordShedding, "counts">;
}

/** Latency buckets in seconds: from a cached JWT call (~0.1 ms) to a queued PBKDF2 (seconds). */
const DURATION_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const WAIT_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

interface CallChildren {
  requests: { inc(): void };
  duration: { observe(value: number): void };
}

/**
 * A metric read when scraped (prom-client `collect()`): a gauge set to `read()`, or a
 * counter that shows `read()`, a total the component keeps anyway. Costs nothing between scrapes.
 */
function scraped(
  registry: Registry,
  kind: "gauge" | "counter",
  name: string,
  help: string,
  read: () => number,
): void {
  if (kind === "gauge")
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read());
      },
    });
  else
    new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(read());
      },
    });
}

/** Create the registry and every metric of a Tessera app. */
export function createMetrics(sources: MetricsSources): Metrics {
  const registry = new Registry();
  let processMetrics = false;

  new Gauge({
    name: "tessera_build_info",
    help: "Always 1; the version label names the running Tessera.",
    labelNames: ["version"],
    registers: [registry],
  }).set({ version: VERSION }, 1);

  const callLabels = ["service", "method", "protocol", "code"] as const;
  const requests = new Counter({
    name: "tessera_rpc_requests_total",
    help: "RPCs finished, by service, method, protocol (connect, grpc, grpc-web) and code (ok or the Connect error code).",
    labelNames: callLabels,
    registers: [registry],
  });
  const duration = new Histogram({
    name: "tessera_rpc_duration_seconds",
    help: "Time from a call's arrival to its answer (for streams: to their end), in seconds.",
    labelNames: callLabels,
    buckets: DURATION_BUCKETS,
    registers: [registry],
  });
  // Per method, per protocol, per code: the prom-client children, made on first use.
  const calls = new Map<DescMethod, Partial<Record<UnaryProtocol, (CallChildren | undefined)[]>>>();
  const callChildren = (method: DescMethod, protocol: UnaryProtocol, code: number): CallChildren => {
    const labels = [method.parent.typeName, method.name, protocol, code === 0 ? "ok" : codeToString(code)];
    return { requests: requests.labels(...labels), duration: duration.labels(...labels) };
  };

  const auth = new Counter({
    name: "tessera_auth_attempts_total",
    help: "Authentications by credential kind presented, outcome (success, failure) and refusal reason (empty on success).",
    labelNames: ["credential", "outcome", "reason"],
    registers: [registry],
  });
  const authChildren = new Map<string, { inc(): void }>();

  new Counter({
    name: "tessera_rate_limit_refusals_total",
    help: "Requests refused by a rate limiter, by limiter (ip, principal, authfail, authfail-user, authfail-user-ip, credential-creations, lockouts).",
    labelNames: ["limiter"],
    registers: [registry],
    collect() {
      this.reset();
      for (const [limiter, n] of Object.entries(sources.limits?.refusals() ?? {})) this.inc({ limiter }, n);
    },
  });

  // The PBKDF2 pool (auth/hash-pool.ts): one per process, read when scraped.
  const poolGauge = (name: string, help: string, read: () => number) =>
    scraped(registry, "gauge", name, help, read);
  const poolCounter = (name: string, help: string, read: () => number) =>
    scraped(registry, "counter", name, help, read);
  poolGauge("tessera_hash_pool_running", "PBKDF2 hashes running now.", () => hashPool().stats().running);
  poolGauge(
    "tessera_hash_pool_queued",
    "PBKDF2 hashes waiting for a slot now (queue depth).",
    () => hashPool().stats().queued,
  );
  poolGauge(
    "tessera_hash_pool_concurrency",
    "PBKDF2 hashes the pool runs at once (auth.hashConcurrency).",
    () => hashPool().options.concurrency,
  );
  poolGauge(
    "tessera_hash_pool_queue_capacity",
    "PBKDF2 hashes that may wait (auth.hashQueue); past it checks are refused with Unavailable.",
    () => hashPool().options.queue,
  );
  poolCounter(
    "tessera_hash_pool_started_total",
    "PBKDF2 hashes started since the process started.",
    () => hashPool().stats().started,
  );
  poolCounter(
    "tessera_hash_pool_refused_total",
    "PBKDF2 hashes refused (queue full) since the process started.",
    () => hashPool().stats().refused,
  );
  // Password checks refused before their body while the pool was full: by method, read when scraped.
  const shedding = sources.shedding;
  if (shedding)
    new Counter({
      name: "tessera_password_checks_shed_total",
      help: "Password checks (Login, ChangePassword) refused with Unavailable before their body was read because the PBKDF2 pool was full, by service and method; logged in aggregate, not one line each.",
      labelNames: ["service", "method"],
      registers: [registry],
      collect() {
        this.reset();
        for (const [method, n] of shedding.counts())
          this.inc({ service: method.parent.typeName, method: method.name }, n);
      },
    });
  const hashWait = new Histogram({
    name: "tessera_hash_pool_wait_seconds",
    help: "Time a PBKDF2 hash waited for a slot before it started, in seconds.",
    buckets: WAIT_BUCKETS,
    registers: [registry],
  });
  // Observed as each hash starts: hashing is rare and costs ~200 ms, so this is nothing.
  const stopWaits = observeHashWaits((seconds) => hashWait.observe(seconds));

  // The subject-state cache (storage/sql.ts).
  const cache = (name: string, help: string, key: "hits" | "misses" | "invalidations") =>
    new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(sources.sql.cacheStats()[key]);
      },
    });
  new Gauge({
    name: "tessera_state_cache_enabled",
    help: "1 when the subject-state cache is on (SQLite always; PostgreSQL while its LISTEN connection is up and every notify trigger is in place), 0 when every request reads the database.",
    registers: [registry],
    collect() {
      this.set(sources.sql.cacheStats().enabled ? 1 : 0);
    },
  });
  new Gauge({
    name: "tessera_state_triggers_missing",
    help: "PostgreSQL: tables lacking the trigger that announces their changes, at the last check (start-up, listener reconnect); above 0 the state cache is off.",
    registers: [registry],
    collect() {
      this.set(sources.sql.cacheStats().triggersMissing ?? 0);
    },
  });
  cache("tessera_state_cache_hits_total", "Subject-state reads answered from the cache.", "hits");
  cache("tessera_state_cache_misses_total", "Subject-state reads that went to the database.", "misses");
  cache(
    "tessera_state_cache_invalidations_total",
    "Times the whole state cache was dropped because a watched table changed.",
    "invalidations",
  );

  // The verified-secret cache (auth/secret-cache.ts): what spares PBKDF2, read when scraped.
  const secrets = sources.secrets;
  if (secrets) {
    const secretMetric = (
      kind: "gauge" | "counter",
      name: string,
      help: string,
      key: keyof SecretCacheStats,
    ) => scraped(registry, kind, name, help, () => secrets.stats()[key]);
    secretMetric(
      "counter",
      "tessera_secret_cache_hits_total",
      "Secret verifications answered by the in-process verified-secret cache.",
      "hits",
    );
    secretMetric(
      "counter",
      "tessera_secret_cache_misses_total",
      "Secret verifications the in-process cache could not answer (then a shared digest, or PBKDF2).",
      "misses",
    );
    secretMetric(
      "counter",
      "tessera_secret_cache_evictions_total",
      "Entries the in-process cache dropped to stay within auth.tokens.cacheMaxBytes.",
      "evictions",
    );
    secretMetric(
      "counter",
      "tessera_secret_cache_shared_hits_total",
      "Misses answered by a shared digest stored beside the credential (one HMAC, no PBKDF2).",
      "sharedHits",
    );
    secretMetric(
      "counter",
      "tessera_secret_cache_shared_writes_total",
      "Shared digests stored after PBKDF2 verified a secret.",
      "sharedWrites",
    );
    secretMetric(
      "counter",
      "tessera_secret_cache_shared_write_failures_total",
      "Shared digests that could not be stored (the credential's next miss hashes again).",
      "sharedWriteFailures",
    );
    secretMetric("gauge", "tessera_secret_cache_entries", "Entries in the in-process cache now.", "entries");
    secretMetric(
      "gauge",
      "tessera_secret_cache_bytes",
      "Heap bytes the in-process cache's entries take now.",
      "bytes",
    );
    secretMetric(
      "gauge",
      "tessera_secret_cache_max_bytes",
      "The in-process cache's bound (auth.tokens.cacheMaxBytes).",
      "maxBytes",
    );
  }

  // The audit buffer and the last-used buffer, read through their `stats()` at scrape time.
  const bufferMetric = (
    stats: (() => AuditStats) | undefined,
    kind: "gauge" | "counter",
    name: string,
    help: string,
    key: keyof AuditStats,
  ) => {
    if (stats !== undefined) scraped(registry, kind, name, help, () => stats()[key]);
  };
  const auditStats = () => sources.audit.stats();
  const auditMetric = (kind: "gauge" | "counter", name: string, help: string, key: keyof AuditStats) =>
    bufferMetric(auditStats, kind, name, help, key);
  auditMetric(
    "gauge",
    "tessera_audit_buffer_depth",
    "Audit events waiting in memory to be written.",
    "depth",
  );
  auditMetric(
    "counter",
    "tessera_audit_dropped_total",
    "Audit events lost (buffer full, or a row the database refused).",
    "dropped",
  );
  auditMetric("counter", "tessera_audit_written_total", "Audit events written to audit_events.", "written");
  auditMetric(
    "counter",
    "tessera_audit_write_failures_total",
    "Failed audit write attempts (retried with backoff).",
    "failures",
  );
  const lastUsed = sources.lastUsed;
  const lastUsedStats = lastUsed ? () => lastUsed.stats() : undefined;
  bufferMetric(
    lastUsedStats,
    "gauge",
    "tessera_last_used_buffer_depth",
    "Credentials' last-used times waiting in memory to be written.",
    "depth",
  );
  bufferMetric(
    lastUsedStats,
    "counter",
    "tessera_last_used_dropped_total",
    "Last-used times lost because the buffer was full.",
    "dropped",
  );

  scraped(
    registry,
    "counter",
    "tessera_access_log_dropped_total",
    "Access log lines lost because stderr was not read fast enough (the access log's memory buffer was full).",
    () => accessLogStats.dropped,
  );

  // The database connection pool (knex's tarn pool under MikroORM).
  const dbPool = new Gauge({
    name: "tessera_db_pool_connections",
    help: "Database pool connections by state: used, free, pending_acquires (callers waiting), pending_creates, max.",
    labelNames: ["state"],
    registers: [registry],
    collect() {
      const pool = knexPool(sources.storage);
      if (pool === undefined) return;
      this.set({ state: "used" }, pool.numUsed());
      this.set({ state: "free" }, pool.numFree());
      this.set({ state: "pending_acquires" }, pool.numPendingAcquires());
      this.set({ state: "pending_creates" }, pool.numPendingCreates());
      this.set({ state: "max" }, pool.max);
    },
  });
  void dbPool;

  return {
    registry,
    observeCall(method, protocol, code, seconds) {
      let byProtocol = calls.get(method);
      if (byProtocol === undefined) {
        byProtocol = {};
        calls.set(method, byProtocol);
      }
      let byCode = byProtocol[protocol];
      if (byCode === undefined) {
        byCode = [];
        byProtocol[protocol] = byCode;
      }
      let children = byCode[code];
      if (children === undefined) {
        children = callChildren(method, protocol, code);
        byCode[code] = children;
      }
      children.requests.inc();
      children.duration.observe(seconds);
    },
    observeAuth(credential, success, reason) {
      const key = success ? credential : `${credential}\0${reason}`;
      let child = authChildren.get(key);
      if (child === undefined) {
        child = auth.labels(credential, success ? "success" : "failure", success ? "" : reason);
        authChildren.set(key, child);
      }
      child.inc();
    },
    scrape: () => registry.metrics(),
    collectProcessMetrics() {
      if (processMetrics) return;
      processMetrics = true;
      collectDefaultMetrics({ register: registry });
    },
    close() {
      stopWaits();
    },
  };
}

/** The pool of knex's tarn, as far as it is reachable (it is not a public API of MikroORM). */
interface TarnPool {
  numUsed(): number;
  numFree(): number;
  numPendingAcquires(): number;
  numPendingCreates(): number;
  max: number;
}

function knexPool(storage: Storage): TarnPool | undefined {
  try {
    const knex = (
      storage.em.getConnection() as { getKnex?: () => { client?: { pool?: unknown } } }
    ).getKnex?.();
    const pool = knex?.client?.pool as Partial<TarnPool> | undefined;
    return typeof pool?.numUsed === "function" ? (pool as TarnPool) : undefined;
  } catch {
    return undefined;
  }
}

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
