import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { initORM, type Storage } from "../src/storage/orm.js";
import { createSqlRunner } from "../src/storage/sql.js";

/**
 * A SQLite file's WAL is checkpointed by a thread of its own, not inside the server's
 * commits on the event loop: the server's connection has automatic checkpoints off, the
 * pages still reach the database file, the WAL stays bounded under writes, and the state
 * cache (which empties on `data_version`) is not disturbed by a checkpoint.
 */
describe("WAL checkpoints of a SQLite file, off the event loop", () => {
  let storage: Storage | undefined;
  let dir: string | undefined;
  afterEach(async () => {
    await storage?.close();
    storage = undefined;
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function until(check: () => boolean, ms = 10_000): Promise<void> {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) throw new Error("condition not met in time");
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  it("copies committed pages into the database file from its thread, with the server connection's own checkpoints off", async () => {
    dir = mkdtempSync(join(tmpdir(), "tessera-checkpoint-"));
    const file = join(dir, "t.db");
    storage = await initORM({ url: `sqlite:${file}` });
    const sql = await createSqlRunner(storage);
    expect(await sql.all("pragma wal_autocheckpoint")).toEqual([{ wal_autocheckpoint: 0 }]);
    const version = async () =>
      (await sql.all<{ data_version: number }>("pragma data_version"))[0]!.data_version;
    const before = statSync(file).size;
    // ~4 MiB of rows: past SQLite's own 1,000-page checkpoint, which is off here.
    const insert = (from: number, n: number) =>
      sql.run(
        "with recursive c(i) as (select 0 union all select i + 1 from c where i + 1 < ?) " +
          "insert into audit_events (id, at, request_id, actor_kind, action, outcome) " +
          "select 'ckpt-' || (? + i), ?, 'r-' || (? + i), 'anonymous', hex(randomblob(60)), 'success' from c",
        [n, from, new Date(), from],
      );
    await insert(0, 20_000);
    const v = await version();
    await until(() => statSync(file).size > before + 2_000_000);
    // A checkpoint is no change of data: the state cache's signal did not move.
    expect(await version()).toBe(v);

    // Writes that go on: the WAL is started over rather than grown without bound.
    for (let round = 1; round <= 5; round++) {
      await insert(round * 20_000, 20_000);
      await new Promise((r) => setTimeout(r, 300));
    }
    expect(statSync(`${file}-wal`).size).toBeLessThan(40 * 1024 * 1024);
    const rows = await sql.all<{ n: number }>(
      "select count(*) as n from audit_events where id like 'ckpt-%'",
    );
    expect(rows[0]!.n).toBe(120_000);
  }, 60_000);
});
