// The metrics counted on the request path (calls, authentications) and the registry that also
// holds the scrape-time ones (metrics/component-metrics.ts) and is served by metrics/server.ts.
import type { DescMethod } from "@bufbuild/protobuf";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { PasswordShedding } from "./admission/shedding.js";
import type { AuditLog, AuditStats } from "./audit.js";
import type { PasswordUpgradeStats, UpgradedSecret } from "./auth/password-upgrade.js";
import type { SecretCacheStats } from "./auth/secret-cache.js";
import { boundHistogramChild } from "./metrics/bound-histogram.js";
import { registerComponentMetrics } from "./metrics/component-metrics.js";
import type { RateLimits } from "./rate-limit.js";
import type { Storage } from "./storage/orm.js";
import type { SqlRunner } from "./storage/sql.js";
import type { UnaryProtocol } from "./transport/unary-protocols.js";
import { VERSION } from "./version.js";

export { type MetricsServer, metricsOff, startMetricsServer } from "./metrics/server.js";

/**
 * Prometheus metrics through prom-client (the registry, the exposition format and Node's
 * default process metrics are its own). Two kinds:
 *
 * - counted on the request path, where nothing else counts: calls (by service, method,
 *   protocol and code, with a latency histogram) and authentication outcomes. Each label
 *   combination's prom-client child is made once and kept, so a call costs two or three
 *   increments; the method label only ever names a registered RPC (the adapter reports
 *   calls to routes it serves, never a path a client made up) or is "unknown" (a request
 *   for any other path, counted all under that one name);
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
   * One request for a path no RPC serves, shaped as a call of `protocol` (answered 404, which
   * its client reads as `unimplemented`): counted as service and method "unknown", never
   * under the path a client made up.
   */
  observeUnknownCall(protocol: UnaryProtocol, seconds: number): void;
  /**
   * One authentication: `credential` what was presented (a {@link CredentialKind}),
   * `reason` the refusal's stable reason (empty on success).
   */
  observeAuth(credential: CredentialKind, success: boolean, reason: string): void;
  /**
   * One finished request to an HTTP endpoint that is not an RPC (the OAuth 2.0 endpoints):
   * `endpoint` its method and path (`POST /oauth2/token`, from a fixed set), `status` the
   * HTTP status, `error` the answer's OAuth error code (empty on success).
   */
  observeHttp(endpoint: string, status: number, error: string, seconds: number): void;
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
  sql: Pick<SqlRunner, "cacheStats" | "rawWritesJoined">;
  audit: Pick<AuditLog, "stats">;
  /** The last-used times' buffer: the same shape of figures as the audit log's. */
  lastUsed?: { stats(): AuditStats };
  limits: RateLimits | undefined;
  storage: Storage;
  /** The verified-secret cache (auth/secret-cache.ts). */
  secrets?: { stats(): SecretCacheStats };
  /** Password hashes (users', machine users' Basic secrets) upgraded to the current iterations (auth/password-upgrade.ts). */
  passwords?: { stats(): Record<UpgradedSecret, PasswordUpgradeStats> };
  /** Password checks shed before their body (admission/shedding.ts). */
  shedding?: Pick<PasswordShedding, "counts">;
  /** WatchRevocations: streams open and events sent (verification/revocation-feed.ts). */
  watch?: { stats(): { open: number; sent: number } };
}

/** Latency buckets in seconds: from a cached JWT call (well under a millisecond) to a queued PBKDF2 (seconds). */
const DURATION_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

interface CallChildren {
  requests: { inc(): void };
  duration: { observe(value: number): void };
}

/**
 * A count of finished requests and their latency histogram, of the same labels; the
 * function returned makes one label set's pair of prom-client children.
 */
function requestMetrics(
  registry: Registry,
  labelNames: readonly string[],
  requests: { name: string; help: string },
  duration: { name: string; help: string },
): (...labels: string[]) => CallChildren {
  const counts = new PendingCounts();
  const counter: Counter = new Counter({
    ...requests,
    labelNames,
    registers: [registry],
    collect: () => counts.addTo(counter),
  });
  const histogram = new Histogram({
    ...duration,
    labelNames,
    buckets: DURATION_BUCKETS,
    registers: [registry],
  });
  return (...labels) => ({
    requests: counts.child(Object.fromEntries(labelNames.map((name, i) => [name, labels[i]!]))),
    duration: boundHistogramChild(histogram, labelNames, labels),
  });
}

/**
 * Counts of label sets kept as plain numbers and added to their counter when it is read
 * (`collect`, at every scrape), so the value read is the same. prom-client's own child
 * re-hashes its labels into a new string on every `inc`, a few hundred bytes per call.
 */
class PendingCounts {
  private readonly children: PendingCount[] = [];

  child(labels: Record<string, string>): PendingCount {
    const child = new PendingCount(labels);
    this.children.push(child);
    return child;
  }

  addTo(counter: Counter): void {
    for (const child of this.children) {
      if (child.n === 0) continue;
      counter.inc(child.labels, child.n);
      child.n = 0;
    }
  }
}

class PendingCount {
  n = 0;
  constructor(readonly labels: Record<string, string>) {}
  inc(): void {
    this.n++;
  }
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

  const callMetrics = requestMetrics(
    registry,
    ["service", "method", "protocol", "code"],
    {
      name: "tessera_rpc_requests_total",
      help: "RPCs finished, by service, method, protocol (connect, grpc, grpc-web) and code (ok or the Connect error code).",
    },
    {
      name: "tessera_rpc_duration_seconds",
      help: "Time from a call's arrival to its answer (for streams: to their end), in seconds.",
    },
  );
  // Per method, per protocol, per code: the prom-client children, made on first use.
  const calls = new Map<DescMethod, Partial<Record<UnaryProtocol, (CallChildren | undefined)[]>>>();
  const callChildren = (method: DescMethod, protocol: UnaryProtocol, code: number): CallChildren =>
    callMetrics(method.parent.typeName, method.name, protocol, code === 0 ? "ok" : codeToString(code));

  const unknownCalls: Partial<Record<UnaryProtocol, CallChildren>> = {};

  const authCounts = new PendingCounts();
  const auth: Counter = new Counter({
    name: "tessera_auth_attempts_total",
    help: "Authentications by credential kind presented, outcome (success, failure) and refusal reason (empty on success).",
    labelNames: ["credential", "outcome", "reason"],
    registers: [registry],
    collect: () => authCounts.addTo(auth),
  });
  const authChildren = new Map<string, { inc(): void }>();

  // The OAuth 2.0 endpoints: labels from fixed sets (the served paths, GET/HEAD/POST/OTHER,
  // the statuses and RFC 6749 error codes the endpoints answer with).
  const httpMetrics = requestMetrics(
    registry,
    ["endpoint", "status", "error"],
    {
      name: "tessera_http_requests_total",
      help: "Requests to the plain HTTP endpoints that are not RPCs (OAuth 2.0; '<method> unknown' for a path nothing serves), by endpoint (method and path), HTTP status and OAuth error code (empty on success).",
    },
    {
      name: "tessera_http_request_duration_seconds",
      help: "Time from such a request's arrival to its answer, in seconds.",
    },
  );
  const httpChildren = new Map<string, CallChildren>();

  const stopWaits = registerComponentMetrics(registry, sources);

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
    observeUnknownCall(protocol, seconds) {
      let children = unknownCalls[protocol];
      if (children === undefined) {
        children = callMetrics("unknown", "unknown", protocol, "unimplemented");
        unknownCalls[protocol] = children;
      }
      children.requests.inc();
      children.duration.observe(seconds);
    },
    observeAuth(credential, success, reason) {
      const key = success ? credential : `${credential}\0${reason}`;
      let child = authChildren.get(key);
      if (child === undefined) {
        child = authCounts.child({
          credential,
          outcome: success ? "success" : "failure",
          reason: success ? "" : reason,
        });
        authChildren.set(key, child);
      }
      child.inc();
    },
    observeHttp(endpoint, status, error, seconds) {
      const key = `${endpoint}\0${status}\0${error}`;
      let children = httpChildren.get(key);
      if (children === undefined) {
        children = httpMetrics(endpoint, String(status), error);
        httpChildren.set(key, children);
      }
      children.requests.inc();
      children.duration.observe(seconds);
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
