import { execFile } from "node:child_process";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import { ScopedAsyncLocalStorage } from "../src/storage/orm-async-context.js";
import { DATABASES, dropSchema, TEST_MASTER_KEY } from "./helpers.js";

const ROOT = join(import.meta.dirname, "..");
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const run = promisify(execFile);

describe("ScopedAsyncLocalStorage", () => {
  const storages: ScopedAsyncLocalStorage<unknown>[] = [];
  function storage<T>(): ScopedAsyncLocalStorage<T> {
    const s = new ScopedAsyncLocalStorage<T>();
    storages.push(s as ScopedAsyncLocalStorage<unknown>);
    return s;
  }
  afterEach(() => {
    for (const s of storages.splice(0)) s.disable();
  });

  it("propagates the store through awaits and timers inside run, and switches off when the run settles", async () => {
    const s = storage<string>();
    expect(s.active).toBe(false);
    const seen: (string | undefined)[] = [];
    const result = await s.run("flush", async () => {
      seen.push(s.getStore());
      await sleep(5);
      seen.push(s.getStore());
      await Promise.all([1, 2].map(async () => seen.push(s.getStore())));
      expect(s.active).toBe(true);
      return 42;
    });
    expect(result).toBe(42);
    expect(seen).toEqual(["flush", "flush", "flush", "flush"]);
    expect(s.active).toBe(false);
    expect(s.getStore()).toBeUndefined();
  });

  it("stays on while any overlapping run is in flight, each seeing its own store", async () => {
    const s = storage<string>();
    let releaseB!: () => void;
    const gateB = new Promise<void>((r) => {
      releaseB = r;
    });
    const a = s.run("a", async () => {
      await sleep(1);
      return s.getStore();
    });
    const b = s.run("b", async () => {
      await gateB;
      await sleep(1);
      return s.getStore();
    });
    expect(await a).toBe("a");
    // a settled; b is still in flight and must still find its store.
    expect(s.active).toBe(true);
    releaseB();
    expect(await b).toBe("b");
    expect(s.active).toBe(false);
  });

  it("counts nested runs and releases on rejection", async () => {
    const s = storage<string>();
    const inner = await s.run("outer", async () => {
      const v = await s.run("inner", async () => {
        await null;
        return s.getStore();
      });
      expect(s.getStore()).toBe("outer");
      return v;
    });
    expect(inner).toBe("inner");
    expect(s.active).toBe(false);

    await expect(
      s.run("failing", async () => {
        await null;
        throw new Error("boom");
      }),
    ).rejects.toThrow("boom");
    expect(s.active).toBe(false);
    expect(() =>
      s.run("sync-throw", () => {
        throw new Error("sync boom");
      }),
    ).toThrow("sync boom");
    expect(s.active).toBe(false);
  });

  it("keeps plain AsyncLocalStorage behaviour for a synchronous callback and for enterWith", async () => {
    const s = storage<string>();
    // Express style: run() returns at once, and work it started goes on afterwards; the
    // store must still reach that work, so a callback that returns no promise pins the storage.
    let fromTimer: string | undefined;
    const fired = new Promise<void>((resolve) => {
      s.run("sync", () => {
        setTimeout(() => {
          fromTimer = s.getStore();
          resolve();
        }, 5);
      });
    });
    await fired;
    expect(fromTimer).toBe("sync");
    expect(s.active).toBe(true);

    const e = storage<string>();
    await (async () => {
      e.enterWith("entered");
      await sleep(1);
      expect(e.getStore()).toBe("entered");
    })();
    expect(e.active).toBe(true);
  });
});

describe("MikroORM's storages in a server process", () => {
  it("the probe can see promise hooks: a plain AsyncLocalStorage turns them on for good", async () => {
    const { stdout } = await run(process.execPath, [
      "--input-type=module",
      "-e",
      `import { AsyncLocalStorage, executionAsyncId } from "node:async_hooks";
       const on = async () => { await null; return executionAsyncId() !== 0; };
       const before = await on();
       await new AsyncLocalStorage().run(1, async () => {});
       console.log(JSON.stringify({ before, after: await on() }));`,
    ]);
    expect(JSON.parse(stdout)).toEqual({ before: false, after: true });
  });

  for (const db of DATABASES) {
    it(`leaves promise hooks off after startup and after ORM writes (${db.name})`, async () => {
      const url = db.url();
      try {
        const { stdout } = await run(TSX, [join(ROOT, "test", "orm-hooks-probe.ts")], {
          cwd: ROOT,
          env: {
            ...process.env,
            PROBE_DB: url,
            TESSERA_ADMIN_PASSWORD: "probe-password-123",
            TESSERA_PASSWORD_ITERATIONS: "1000",
            TESSERA_LOG_LEVEL: "silent",
            // PostgreSQL refuses to start without a master key (keys at rest).
            TESSERA_MASTER_KEY: TEST_MASTER_KEY,
          },
        });
        const report = JSON.parse(stdout.trim().split("\n").at(-1) ?? "{}");
        expect(report).toMatchObject({
          beforeStartup: false,
          serveExit: 0,
          scoped: true,
          afterStartup: false,
          loginStatus: 200,
          meStatus: 200,
          me: { username: "admin" },
          afterWrites: false,
        });
      } finally {
        await dropSchema(url);
      }
    }, 60_000);
  }
});
