import { createClient } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../gen/grpc/health/v1/health_pb.js";
import { createHealthService } from "../src/services/health/health-service.js";
import { ServingState } from "../src/services/health/serving-state.js";
import { SQLITE, startTestServer } from "./helpers.js";

/**
 * A shutdown as gRPC health clients see it (what SIGTERM runs, driven in process): a gRPC
 * readiness probe must stop routing when /ready does, and a watch must not hold the
 * shutdown for its whole grace period and then be cut.
 */
describe("grpc.health.v1.Health during a shutdown", () => {
  it("answers NOT_SERVING from the drain's start, and its watches end with OK when the port closes", async () => {
    const ts = await startTestServer(SQLITE);
    try {
      const health = createClient(Health, ts.grpc());
      expect((await health.check({ service: "" })).status).toBe(Status.SERVING);
      const watch = health.watch({ service: "" })[Symbol.asyncIterator]();
      expect((await watch.next()).value?.status).toBe(Status.SERVING);

      const started = performance.now();
      const closing = ts.server.close(20_000, 2_000);
      // During the drain delay everything is still served, and health tells it is going away.
      expect((await health.check({ service: "" })).status).toBe(Status.NOT_SERVING);
      const told = await watch.next();
      expect(told.value?.status).toBe(Status.NOT_SERVING);
      expect(performance.now() - started).toBeLessThan(1_500);
      // Then the watch ends cleanly (a gRPC error would throw here), and nothing was cut.
      expect((await watch.next()).done).toBe(true);
      expect(await closing).toEqual({ cut: 0 });
      // Not the 20 s grace period.
      expect(performance.now() - started).toBeLessThan(8_000);
    } finally {
      await ts.app.close();
    }
  });

  it("tells a drain that begins while its database ping is in flight, or between two turns of a watch", async () => {
    const serving = new ServingState();
    const pings: ((up: boolean) => void)[] = [];
    const health = createHealthService({
      ping: () => new Promise<boolean>((resolve) => pings.push(resolve)),
      services: [],
      serving,
    });
    // A check whose ping was sent before the drain began and answered after it.
    const checking = health.check({ service: "" } as never, {} as never) as Promise<{ status: Status }>;
    serving.drain();
    pings.shift()!(true);
    expect((await checking).status).toBe(Status.NOT_SERVING);

    const watching = new ServingState();
    const watched = createHealthService({ ping: async () => true, services: [], serving: watching });
    const abort = new AbortController();
    const turns = (
      watched.watch({ service: "" } as never, { signal: abort.signal } as never) as AsyncIterable<{
        status: Status;
      }>
    )[Symbol.asyncIterator]();
    expect((await turns.next()).value.status).toBe(Status.SERVING);
    // The drain lands after the watch said SERVING and before its next turn sleeps: it must
    // not sleep its 5 s out first.
    watching.drain();
    const started = performance.now();
    expect((await turns.next()).value.status).toBe(Status.NOT_SERVING);
    expect(performance.now() - started).toBeLessThan(1000);
    abort.abort();
  });
});
