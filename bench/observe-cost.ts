/**
 * `npx tsx bench/observe-cost.ts [file]`: the CPU cost, per call, of observing a finished
 * call (src/call-observer.ts): the metrics alone, the access line through a logger set up
 * as the service logger (one write per line, redaction list), the access line through the
 * access logger of `tessera serve` (gathered writes, no redaction), and metrics with that
 * access line. Lines go to `file` (default /dev/null). Variants alternate in rounds, so
 * that load elsewhere on the machine hits each alike; run it pinned (`taskset -c 0`).
 *
 * Why beside the load benchmark: on a shared two-core machine the whole-server benchmark's
 * noise (±15 % between runs) is far above the 1–2 % at stake here; CPU time of the
 * observer alone, in a loop, is steady to a few tenths of a µs.
 */
import { openSync } from "node:fs";
import { pino } from "pino";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { AccessLogWriter, accessLogOf } from "../src/access-log.js";
import { type CallObserver, createCallObserver } from "../src/call-observer.js";
import type { RequestState } from "../src/context.js";
import { REDACT } from "../src/logger.js";
import { createMetrics, type MetricsSources } from "../src/metrics.js";

const file = process.argv[2] ?? "/dev/null";
const sources = {
  sql: { cacheStats: () => ({ enabled: true, hits: 0, misses: 0, invalidations: 0 }) },
  audit: {},
  limits: undefined,
  storage: {},
} as unknown as MetricsSources;
const base = { service: "tessera" };
// As createLogger (src/logger.ts) sets up the service logger.
const serviceLogger = pino(
  {
    level: "info",
    base,
    redact: REDACT,
  },
  pino.destination({ dest: file, sync: true }),
);
// As `tessera serve` sets up the access log (src/access-log.ts), writing to `file`.
const accessLog = new AccessLogWriter("info", openSync(file, "a"));
const prefixes = { pat: "tsr_pat_", apiKey: "tsr_key_", machine: "tsr_mu_" };
const method = UserService.method.getCurrentUser;
const headers = { authorization: "Bearer eyJ.x.y", "content-type": "application/json" };
const state = (): RequestState => ({
  requestId: "0b7c6f2e-2f3a-4b6e-9a43-4c2f0a7e9d11",
  ip: "127.0.0.1",
  certificate: null,
  principal: {
    kind: "user",
    method: "jwt",
    id: "5f0c2a8e-1b2c-4d3e-8f90-123456789abc",
    tenantId: "7d1e0c55-0c1a-4f7b-a7a5-2b8f1e0d9c33",
    scopes: [],
  },
  admission: "admitted",
  startedAt: performance.now(),
});
const variants: [string, CallObserver][] = [
  [
    "metrics only",
    createCallObserver({ metrics: createMetrics(sources), log: accessLog, access: "off", prefixes })!,
  ],
  [
    "access line, service logger",
    createCallObserver({ metrics: undefined, log: accessLogOf(serviceLogger), access: "info", prefixes })!,
  ],
  [
    "access line, access logger",
    createCallObserver({ metrics: undefined, log: accessLog, access: "info", prefixes })!,
  ],
  [
    "metrics + access logger (default)",
    createCallObserver({ metrics: createMetrics(sources), log: accessLog, access: "info", prefixes })!,
  ],
];
const N = 200_000;
const BATCH = 100;
const results = new Map<string, number[]>();
for (let round = 0; round < 5; round++)
  for (const [name, observe] of variants) {
    const s = state();
    const before = process.cpuUsage();
    // In batches with a turn of the event loop between them, as calls come: the access log's
    // asynchronous writes complete (and their CPU, on libuv's threads, is counted).
    for (let i = 0; i < N; i += BATCH) {
      for (let j = 0; j < BATCH; j++) observe(s, headers, method, "connect", 0);
      await new Promise(setImmediate);
    }
    const used = process.cpuUsage(before);
    if (round > 0) results.set(name, [...(results.get(name) ?? []), (used.user + used.system) / N]);
  }
for (const [name, runs] of results) {
  const sorted = [...runs].sort((a, b) => a - b);
  const median = (sorted[1]! + sorted[2]!) / 2;
  process.stdout.write(
    `${name.padEnd(36)} median ${median.toFixed(2)} µs CPU per call (rounds: ${runs.map((r) => r.toFixed(2)).join(", ")})\n`,
  );
}
await accessLog.close();
