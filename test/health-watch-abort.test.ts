import type { HandlerContext } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { HealthCheckResponse_ServingStatus as Status } from "../gen/grpc/health/v1/health_pb.js";
import { createHealthService } from "../src/services/health/health-service.js";

describe("Health/Watch", () => {
  it("ends at once when the call is aborted while its status is read, not after its 5 s wait", async () => {
    const ac = new AbortController();
    const health = createHealthService({
      // The client goes away while the status is being read.
      ping: async () => {
        ac.abort();
        return true;
      },
      services: [],
    });
    const watch = health.watch!(
      { service: "" } as never,
      { signal: ac.signal } as HandlerContext,
    ) as AsyncGenerator<{
      status: Status;
    }>;
    expect((await watch.next()).value).toMatchObject({ status: Status.SERVING });
    const started = performance.now();
    const next = await Promise.race([
      watch.next(),
      new Promise<"still waiting">((resolve) => setTimeout(() => resolve("still waiting"), 3000)),
    ]);
    // Before: the abort listener was added to a signal already aborted, so it never fired.
    expect(next).toEqual({ done: true, value: undefined });
    expect(performance.now() - started).toBeLessThan(3000);
  });
});
