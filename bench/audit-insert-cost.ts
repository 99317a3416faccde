// CPU time of one audit insert on SQLite by rows per insert: the time better-sqlite3 holds the
// event loop per flush (it writes in the calling turn), split into a per-statement and a
// per-row part, on a table that already holds `--rows` events (the indexes' depth matters).
// CPU time (getrusage, this process has no other busy thread: checkpoints are run between
// rounds, outside the measured inserts), not wall time: what the machine's load does not inflate
// (much: caches are shared). Sizes are interleaved, so that drift hits each alike.
// Run: npx tsx bench/audit-insert-cost.ts [--root <checkout>] [--rows 100000] [--rounds 200]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const { values: flags } = parseArgs({
  options: {
    root: { type: "string", default: "." },
    rows: { type: "string", default: "100000" },
    rounds: { type: "string", default: "200" },
    sizes: { type: "string", default: "1,4,8,16,32,64" },
  },
});
const root = resolve(flags.root);
const load = (path: string) => import(pathToFileURL(join(root, path)).href);
const { initORM } = await load("src/storage/orm.ts");
const { AuditEventRepository } = await load("src/storage/repositories/audit.ts");
const { createSqlRunner } = await load("src/storage/sql.ts");
const { uuidV7 } = await load("src/storage/uuid-v7.ts");

const dir = mkdtempSync(join(tmpdir(), "tessera-audit-cost-"));
const storage = await initORM({ url: `sqlite:${join(dir, "t.db")}` });
const sql = await createSqlRunner(storage);
const execute = (s: string) => storage.em.getConnection().execute(s);
await execute("pragma wal_autocheckpoint = 0");
const repo = new AuditEventRepository(sql);

/** An event as VerifyCredential records it (server-made request id, a machine caller). */
const event = () => {
  const now = Date.now();
  return {
    id: uuidV7(now),
    at: new Date(now),
    requestId: uuidV7(now),
    tenantId: "00000000-0000-7000-8000-000000000001",
    actorKind: "machine",
    actorId: "0193a0a0-0000-7000-8000-00000000beef",
    action: "VerificationService/VerifyCredential",
    targetId: "0193a0a0-0000-7000-8000-0000000000aa",
    outcome: "success",
    reason: null,
    ip: "127.0.0.1",
  };
};
const batch = (n: number) => Array.from({ length: n }, event);

for (let done = 0; done < Number(flags.rows); done += 64) await repo.insert(batch(64));
await execute("pragma wal_checkpoint(truncate)");

const sizes = flags.sizes.split(",").map(Number);
const samples = new Map<number, number[]>(sizes.map((n) => [n, []]));
for (let round = 0; round < Number(flags.rounds); round++) {
  for (const n of sizes) {
    const rows = batch(n);
    const before = process.cpuUsage();
    await repo.insert(rows);
    const cpu = process.cpuUsage(before);
    samples.get(n)!.push((cpu.user + cpu.system) / 1000);
  }
  if (round % 20 === 19) await execute("pragma wal_checkpoint(truncate)");
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const p90 = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * 0.9)]!;
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
const table = sizes.map((n) => {
  const xs = samples.get(n)!;
  return { rows: n, meanMs: mean(xs), medianMs: median(xs), p90Ms: p90(xs), usPerRow: (mean(xs) * 1000) / n };
});
// Least squares over the means: per-statement and per-row CPU.
const xm = mean(table.map((t) => t.rows));
const ym = mean(table.map((t) => t.meanMs));
const slope =
  table.reduce((a, t) => a + (t.rows - xm) * (t.meanMs - ym), 0) /
  table.reduce((a, t) => a + (t.rows - xm) ** 2, 0);
process.stdout.write(
  `${JSON.stringify({ root, tableRows: Number(flags.rows), rounds: Number(flags.rounds), perStatementUs: (ym - slope * xm) * 1000, perRowUs: slope * 1000, sizes: table }, null, 1)}\n`,
);
await storage.orm.close(true);
rmSync(dir, { recursive: true, force: true });
