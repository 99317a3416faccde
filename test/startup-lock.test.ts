import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { initORM, type Storage } from "../src/storage/orm.js";
import { StartupLockTimeoutError, withFileLock, withPostgresLock } from "../src/storage/startup-lock.js";
import { dropSchema, POSTGRES } from "./helpers.js";

/** Runs `n` tasks at once through `lock`, recording how many were inside at the same time. */
async function maxInside(n: number, lock: (fn: () => Promise<void>) => Promise<void>): Promise<number> {
  let inside = 0;
  let max = 0;
  await Promise.all(
    Array.from({ length: n }, () =>
      lock(async () => {
        inside++;
        max = Math.max(max, inside);
        // Yield a few turns of the event loop, so that an unlocked overlap would show.
        for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
        inside--;
      }),
    ),
  );
  return max;
}

describe("the SQLite start-up lock file", () => {
  it("lets one holder in at a time, even within one process", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "tessera-lock-")), "t.db-startup.lock");
    expect(await maxInside(4, (fn) => withFileLock(path, fn))).toBe(1);
  });

  it("gives up with a clear error when another holder keeps it past the timeout", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "tessera-lock-")), "t.db-startup.lock");
    let release!: () => void;
    const held = withFileLock(path, () => new Promise<void>((r) => (release = r)));
    await expect(withFileLock(path, async () => undefined, 150)).rejects.toBeInstanceOf(
      StartupLockTimeoutError,
    );
    release();
    await held;
    // Released: the next holder gets in.
    await expect(withFileLock(path, async () => "ok", 150)).resolves.toBe("ok");
  });
});

describe("the PostgreSQL start-up lock", () => {
  const open: { storage: Storage; url: string }[] = [];
  afterAll(async () => {
    for (const { storage, url } of open) {
      await storage.close();
      await dropSchema(url);
    }
  });
  async function storageOn(url: string, statementTimeoutMs?: number): Promise<Storage> {
    const storage = await initORM({
      url,
      migrate: false,
      ...(statementTimeoutMs ? { bounds: { statementTimeoutMs } } : {}),
    });
    open.push({ storage, url });
    return storage;
  }

  it("lets one holder of a schema in at a time, across connection pools", async () => {
    const url = POSTGRES.url();
    const [a, b] = [await storageOn(url), await storageOn(url)];
    const schema = a.target.schema!;
    let turn = 0;
    expect(await maxInside(4, (fn) => withPostgresLock((turn++ % 2 ? a : b).em, schema, fn))).toBe(1);
  });

  it("makes concurrent callers through one storage wait for each other, and migrates under it", async () => {
    const storage = await storageOn(POSTGRES.url());
    expect(await maxInside(3, (fn) => storage.withStartupLock(fn))).toBe(1);
    const applied = await storage.withStartupLock((held) => held.migrate());
    expect(applied.length).toBeGreaterThan(0);
  });

  it("gives up with a clear error when another instance holds it past the timeout", async () => {
    const url = POSTGRES.url();
    const [a, b] = [await storageOn(url), await storageOn(url)];
    const schema = a.target.schema!;
    let release!: () => void;
    let entered!: () => void;
    const inside = new Promise<void>((r) => (entered = r));
    const held = withPostgresLock(a.em, schema, () => {
      entered();
      return new Promise<void>((r) => (release = r));
    });
    await inside;
    await expect(withPostgresLock(b.em, schema, async () => undefined, 200)).rejects.toBeInstanceOf(
      StartupLockTimeoutError,
    );
    release();
    await held;
  });

  it("waits for another instance's start-up past the per-statement bound, which still bounds other statements", async () => {
    const url = POSTGRES.url();
    const [a, b] = [await storageOn(url, 300), await storageOn(url, 300)];
    const schema = a.target.schema!;
    let entered!: () => void;
    const inside = new Promise<void>((r) => (entered = r));
    // `a` holds the lock for 2 s (migrating, say); `b`'s wait is one statement of 2 s.
    const held = withPostgresLock(a.em, schema, async () => {
      entered();
      await new Promise((r) => setTimeout(r, 2_000));
    });
    await inside;
    const t0 = Date.now();
    await expect(b.withStartupLock((h) => h.migrate())).resolves.not.toHaveLength(0);
    expect(Date.now() - t0).toBeGreaterThan(1_500);
    await held;
    // The bound is in force for everything else: the server cancels a long statement (57014).
    await expect(b.em.getConnection().execute("select pg_sleep(2)")).rejects.toMatchObject({ code: "57014" });
  });

  it("lets three storages migrate one fresh schema at once, one of them applying", async () => {
    const url = POSTGRES.url();
    const storages = [await storageOn(url), await storageOn(url), await storageOn(url)];
    const applied = await Promise.all(storages.map((s) => s.migrate()));
    // Exactly one applied the migrations; the others found them applied.
    expect(applied.filter((names) => names.length > 0)).toHaveLength(1);
  });

  it("lets two storages migrate one SQLite file at once, one of them applying", async () => {
    const url = `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-lock-")), "t.db")}`;
    const storages = [await initORM({ url, migrate: false }), await initORM({ url, migrate: false })];
    try {
      const applied = await Promise.all(storages.map((s) => s.migrate()));
      expect(applied.filter((names) => names.length > 0)).toHaveLength(1);
    } finally {
      for (const s of storages) await s.close();
    }
  });
});
