import { afterEach, describe, expect, it } from "vitest";
import { PgNotifier } from "../src/storage/pg-notify.js";
import { PgStateCache } from "../src/storage/pg-state.js";
import { POSTGRES } from "./helpers.js";

/**
 * A write to state returns only once every other instance's cache can no longer hold what
 * it changed. When the barrier itself cannot run (the database went away right after the
 * commit), the others cannot be asked; one cut off without a reset still trusts its cache
 * until its listening session has gone unproven for the bound (PgStateCache.enabled), so
 * the write waits that long before it returns.
 */
describe.skipIf(process.env.TESSERA_TEST_SKIP_POSTGRES === "1")("the state barrier (postgres)", () => {
  const notifiers: PgNotifier[] = [];
  afterEach(async () => {
    for (const n of notifiers.splice(0)) await n.close();
  });

  it("waits out the bound before returning when it cannot reach the database", async () => {
    const url = POSTGRES.url().replace(/\?.*$/, "");
    const notifier = new PgNotifier({ url });
    notifiers.push(notifier);
    const bound = 300;
    const cache = new PgStateCache(notifier, {
      perStatement: 10,
      channel: `tessera_test_barrier_${process.pid}`,
      barrierTimeoutMs: bound,
      notify: () => Promise.reject(new Error("connection reset")),
      peers: async () => [],
      alive: async () => [],
      terminate: async () => undefined,
      missingTriggers: async () => [],
    });
    await notifier.start();
    expect(notifier.online).toBe(true);
    const started = performance.now();
    await cache.barrier();
    expect(performance.now() - started).toBeGreaterThanOrEqual(bound);
  });

  it("trusts a listening session only within the bound after its last answered query", async () => {
    const url = POSTGRES.url().replace(/\?.*$/, "");
    // No keepalive within the test: the proof is the start's LISTEN.
    const notifier = new PgNotifier({ url, keepaliveMs: 60_000 });
    notifiers.push(notifier);
    notifier.subscribe(`tessera_test_lease_${process.pid}`, () => undefined);
    await notifier.start();
    const proven = performance.now();
    expect(notifier.provenWithin(60_000)).toBe(true);
    while (performance.now() - proven < 50) await new Promise((r) => setTimeout(r, 10));
    expect(notifier.online).toBe(true);
    expect(notifier.provenWithin(50)).toBe(false);
  });
});
