// The metrics read when scraped, from figures the components keep anyway (rate limiters, the
// PBKDF2 pool, the state and secret caches, the audit and last-used buffers, the database
// pool): they cost nothing between scrapes, unlike the request-path counters in metrics.ts.
import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import { accessLogStats } from "../access-log.js";
import type { AuditStats } from "../audit.js";
import { hashPool, observeHashWaits } from "../auth/hash-pool.js";
import { UPGRADED_SECRETS } from "../auth/password-upgrade.js";
import type { SecretCacheStats } from "../auth/secret-cache.js";
import type { MetricsSources } from "../metrics.js";
import type { Storage } from "../storage/orm.js";
import { registerServerMetrics } from "./server-metrics.js";

const WAIT_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

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

/**
 * Register every scrape-time metric of `sources` in `registry`, in exposition order.
 * @returns a function that stops observing process-wide sources (the hash pool's waits).
 */
export function registerComponentMetrics(registry: Registry, sources: MetricsSources): () => void {
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

  new Counter({
    name: "tessera_rate_limit_local_total",
    help: "Rate-limit calls counted in this instance's memory because Redis did not answer within rateLimit.redisTimeoutMs (or was known away), by limiter; absent without Redis.",
    labelNames: ["limiter"],
    registers: [registry],
    collect() {
      this.reset();
      for (const [limiter, n] of Object.entries(sources.limits?.countedLocally() ?? {}))
        this.inc({ limiter }, n);
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
  // Observed as each hash starts: hashing is rare and slow, so this costs nothing next to it.
  const stopWaits = observeHashWaits((seconds) => hashWait.observe(seconds));

  // The subject-state cache (storage/sql.ts).
  const cache = (name: string, help: string, key: "hits" | "misses" | "invalidations") =>
    scraped(registry, "counter", name, help, () => sources.sql.cacheStats()[key]);
  new Gauge({
    name: "tessera_state_cache_enabled",
    help: "1 when the subject-state cache is on (SQLite always; PostgreSQL while its LISTEN connection is up, answered a keepalive sent within database.barrierTimeoutMs, and every notify trigger is in place), 0 when every request reads the database.",
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
  scraped(
    registry,
    "counter",
    "tessera_sqlite_raw_writes_joined_total",
    "SQLite: raw writes that ran inside an ORM transaction held open 1 s or more (or after waiting 10 s).",
    () => sources.sql.rawWritesJoined?.() ?? 0,
  );
  cache("tessera_state_cache_hits_total", "Subject-state reads answered from the cache.", "hits");
  cache("tessera_state_cache_misses_total", "Subject-state reads that went to the database.", "misses");
  cache(
    "tessera_state_cache_invalidations_total",
    "Times the whole state cache was dropped because a watched table changed.",
    "invalidations",
  );

  // Password hashes re-made at the current iterations after a successful check
  // (auth/password-upgrade.ts), users' and machine users' apart: each has its own remedy.
  const passwords = sources.passwords;
  if (passwords) {
    const outcomes = ["upgraded", "deferred", "failed"] as const;
    new Counter({
      name: "tessera_password_hash_upgrades_total",
      help: "Password hashes (users', machine users' Basic secrets) with outdated iterations after a successful check: upgraded, deferred (hash pool busy), failed (not stored).",
      labelNames: ["kind", "outcome"],
      registers: [registry],
      collect() {
        const stats = passwords.stats();
        this.reset();
        for (const kind of UPGRADED_SECRETS)
          for (const outcome of outcomes) this.inc({ kind, outcome }, stats[kind][outcome]);
      },
    });
  }

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
    secretMetric(
      "counter",
      "tessera_secret_cache_shared_read_failures_total",
      "Shared digests that could not be read (then PBKDF2 verified the secret).",
      "sharedReadFailures",
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

  registerServerMetrics(registry);

  scraped(
    registry,
    "counter",
    "tessera_access_log_dropped_total",
    "Access log lines (and, under tessera serve, audit lines) lost because stderr was not read fast enough (the access log's memory buffer was full).",
    () => accessLogStats.dropped,
  );

  const watch = sources.watch;
  if (watch) {
    scraped(
      registry,
      "gauge",
      "tessera_watch_streams_open",
      "WatchRevocations streams open now.",
      () => watch.stats().open,
    );
    scraped(
      registry,
      "counter",
      "tessera_watch_events_sent_total",
      "Revocation events sent on WatchRevocations streams (an event counts once per stream).",
      () => watch.stats().sent,
    );
  }

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
  return stopWaits;
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
