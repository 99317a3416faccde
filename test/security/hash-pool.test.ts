import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { HashPool, hashPool } from "../../src/auth/hash-pool.js";
import { Code, rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { basic } from "../machine-fixtures.js";

/** A pool of one hash at a time with two waiting: a burst of ten leaves seven to refuse. */
const QUEUE = 2;
const BURST = 10;

describe.each(DATABASES)("the bounded PBKDF2 pool over a real server on $name", (db) => {
  let ts: TestServer;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      // Slow enough (~200 ms a hash, more on a busy machine) that the burst is all in before the first hash ends.
      auth: { passwordIterations: 600_000, hashConcurrency: 1, hashQueue: QUEUE },
    });
    // The dummy hash for unknown usernames is made once, on first use: not during the burst.
    await rejection(createClient(UserService, ts.connect()).login({ username: "warm-up", password: "x" }));
  });
  afterAll(async () => {
    await ts.close();
  });

  /** Ten calls at once; each outcome with the order in which it settled. */
  async function burstOf(call: (i: number) => Promise<unknown>) {
    let settled = 0;
    const outcomes = await Promise.all(
      Array.from({ length: BURST }, async (_, i) => {
        const r = await rejection(call(i));
        return { ...r, order: settled++ };
      }),
    );
    const busy = outcomes.filter((o) => o.code === Code.Unavailable);
    const verdicts = outcomes.filter((o) => o.code === Code.Unauthenticated);
    return { busy, verdicts };
  }

  function expectRefusedAtOnce({ busy, verdicts }: Awaited<ReturnType<typeof burstOf>>): void {
    expect(verdicts).toHaveLength(1 + QUEUE);
    expect(busy).toHaveLength(BURST - 1 - QUEUE);
    for (const r of busy) {
      expect(r.reason).toBe("UNAVAILABLE");
      expect(Number(r.error.metadata.get("retry-after"))).toBeGreaterThan(0);
    }
    // At once: every refusal came back before the first hash finished.
    const firstVerdict = Math.min(...verdicts.map((v) => v.order));
    for (const r of busy) expect(r.order).toBeLessThan(firstVerdict);
  }

  it("refuses Login guesses past the pool and its queue at once with Unavailable and Retry-After", async () => {
    const client = createClient(UserService, ts.connect());
    expectRefusedAtOnce(
      await burstOf((i) => client.login({ username: `nobody-${i}`, password: `guess ${i}` })),
    );
  });

  it("refuses HTTP Basic checks past the pool and its queue in the same way", async () => {
    const transport = ts.connect();
    expectRefusedAtOnce(
      await burstOf((i) =>
        createClient(UserService, withHeaders(transport, basic(`nobody-${i}`, `guess ${i}`))).getCurrentUser(
          {},
        ),
      ),
    );
  });

  it("answers again once the burst has drained", async () => {
    expect(hashPool().stats()).toMatchObject({ running: 0, queued: 0 });
    const r = await rejection(
      createClient(UserService, ts.connect()).login({ username: "nobody", password: "x" }),
    );
    expect(r.reason).toBe("CREDENTIALS_INVALID");
  });
});

describe("HashPool", () => {
  it("runs at most its concurrency at once and starts the queued in order", async () => {
    const pool = new HashPool({ concurrency: 2, queue: 10 });
    const releases: Array<() => void> = [];
    const started: number[] = [];
    const runs = Array.from({ length: 5 }, (_, i) =>
      pool.run(
        () =>
          new Promise<number>((resolve) => {
            started.push(i);
            releases.push(() => resolve(i));
          }),
      ),
    );
    expect(started).toEqual([0, 1]);
    expect(pool.stats()).toMatchObject({ running: 2, queued: 3 });
    releases[0]!();
    await runs[0];
    await Promise.resolve();
    expect(started).toEqual([0, 1, 2]);
    for (let i = 1; i < 5; i++) {
      releases[i]!();
      await runs[i];
      await Promise.resolve();
    }
    expect(await Promise.all(runs)).toEqual([0, 1, 2, 3, 4]);
    expect(pool.stats()).toMatchObject({ running: 0, queued: 0, started: 5, refused: 0 });
  });

  it("frees its slot when a hash fails", async () => {
    const pool = new HashPool({ concurrency: 1, queue: 0 });
    await expect(pool.run(() => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    await expect(pool.run(async () => 1)).resolves.toBe(1);
  });
});
