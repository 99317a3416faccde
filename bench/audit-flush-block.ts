// How long the audit log's writes hold the event loop, under a steady stream of records
// (VerifyCredential audits every call): the longest synchronous stretch of each insert, and
// the event loop's delay (perf_hooks.monitorEventLoopDelay) while records arrive at a fixed
// rate. On SQLite better-sqlite3 writes in the calling turn, so every row of a batch is time
// during which no request is answered. Delay is wall-clock: on a loaded machine read the
// insert stretches and their row counts (CPU work) first.
// Run: npx tsx bench/audit-flush-block.ts [--root <checkout>] [--rate 2000] [--seconds 10] [--db sqlite|postgres]
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { pino } from "pino";

const { values: flags } = parseArgs({
  options: {
    root: { type: "string", default: "." },
    rate: { type: "string", default: "2000" },
    seconds: { type: "string", default: "10" },
    db: { type: "string", default: "sqlite" },
  },
});
const root = resolve(flags.root);
const rate = Number(flags.rate);
const seconds = Number(flags.seconds);
const load = (path: string) => import(pathToFileURL(join(root, path)).href);

const { createAuditLog } = await load("src/audit.ts");
const { initORM } = await load("src/storage/orm.ts");
const { AuditEventRepository } = await load("src/storage/repositories/audit.ts");
const { createSqlRunner } = await load("src/storage/sql.ts");
// Request ids as the checkout's server makes them (time-ordered once uuid-v7.ts exists).
const requestId: () => string = existsSync(join(root, "src/storage/uuid-v7.ts"))
  ? (await load("src/storage/uuid-v7.ts")).uuidV7
  : randomUUID;

const dir = mkdtempSync(join(tmpdir(), "tessera-audit-block-"));
const schema = `bench_audit_block_${Date.now().toString(36)}`;
const url =
  flags.db === "postgres"
    ? `postgres://postgres@127.0.0.1:5432/test?schema=${schema}`
    : `sqlite:${join(dir, "t.db")}`;
const storage = await initORM({ url });
const sql = await createSqlRunner(storage);
const repo = new AuditEventRepository(sql);

/** Every insert: rows, and the synchronous stretch (call to return: better-sqlite3 runs in it). */
const inserts: { rows: number; syncMs: number }[] = [];
const events = {
  insert(rows: unknown[]) {
    const start = performance.now();
    const done = repo.insert(rows);
    inserts.push({ rows: rows.length, syncMs: performance.now() - start });
    return done;
  },
  deleteBefore: (cutoff: Date, batch: number) => repo.deleteBefore(cutoff, batch),
  // Absent before the bound existed (a base checkout): the log then uses its own.
  batchRows: repo.batchRows as number | undefined,
};
const logger = pino({ level: "silent" });

const entry = {
  requestId: randomUUID(),
  tenantId: randomUUID(),
  actorKind: "machine_user",
  actorId: randomUUID(),
  action: "credential.verify",
  targetId: randomUUID(),
  outcome: "success",
  reason: "VALID",
  ip: "127.0.0.1",
};

// SQLite: pages written to the WAL per row (checkpoints off meanwhile, so the WAL holds them
// all) and CPU per row, on a table that already holds 65,536 events (a random key costs a
// page per row only once its index is larger than a batch), writing 8,192 records as the log
// does under load: a flush each 100 records (its eager depth). I/O and CPU counts that the
// machine's load does not change.
let walFramesPerRow: number | null = null;
let cpuUsPerRow: number | null = null;
if (flags.db !== "postgres") {
  const fill = createAuditLog({ events: repo, logger, flushMs: 60_000, bufferSize: 1 << 20 });
  for (let i = 0; i < 65_536; i++) fill.record({ ...entry, requestId: requestId() });
  while (fill.stats().depth > 0) await fill.flush();
  await fill.close();
  await sql.run("pragma wal_autocheckpoint = 0");
  await sql.run("pragma wal_checkpoint(truncate)");
  const probe = createAuditLog({ events, logger, flushMs: 60_000 });
  const n = 8192;
  const cpu = process.cpuUsage();
  for (let i = 0; i < n; i++) {
    probe.record({ ...entry, requestId: requestId() });
    if (i % 100 === 99) await probe.flush();
  }
  while (probe.stats().depth > 0) await probe.flush();
  const used = process.cpuUsage(cpu);
  cpuUsPerRow = Number(((used.user + used.system) / n).toFixed(1));
  walFramesPerRow = Number(((statSync(join(dir, "t.db-wal")).size - 32) / (4096 + 24) / n).toFixed(2));
  await probe.close();
  await sql.run("pragma wal_checkpoint(truncate)");
  await sql.run("pragma wal_autocheckpoint = 1000");
  inserts.length = 0;
}

const audit = createAuditLog({ events, logger });
// Records at `rate` per second, a few per millisecond-timer tick (as requests would come).
const delay = monitorEventLoopDelay({ resolution: 1 });
delay.enable();
const total = rate * seconds;
let sent = 0;
const started = performance.now();
await new Promise<void>((done) => {
  const tick = () => {
    const due = Math.min(total, Math.round(((performance.now() - started) / 1000) * rate));
    while (sent < due) {
      audit.record({ ...entry, requestId: requestId() });
      sent++;
    }
    if (sent >= total) done();
    else setTimeout(tick, 1);
  };
  tick();
});
await audit.flush();
delay.disable();
await audit.close();

const sorted = [...inserts].sort((a, b) => b.syncMs - a.syncMs);
const rows = inserts.reduce((n, i) => n + i.rows, 0);
const ms = (n: number) => Number(n.toFixed(2));
console.log(
  JSON.stringify({
    root,
    db: flags.db,
    rate,
    seconds,
    walFramesPerRow,
    cpuUsPerRow,
    records: sent,
    written: audit.stats().written,
    dropped: audit.stats().dropped,
    inserts: inserts.length,
    meanRowsPerInsert: ms(rows / Math.max(1, inserts.length)),
    maxRowsPerInsert: Math.max(...inserts.map((i) => i.rows)),
    longestInsertMs: ms(sorted[0]?.syncMs ?? 0),
    longestInsertRows: sorted[0]?.rows ?? 0,
    insertMsPerRow: ms(inserts.reduce((n, i) => n + i.syncMs, 0) / Math.max(1, rows)),
    loopDelayMaxMs: ms(delay.max / 1e6),
    loopDelayP99Ms: ms(delay.percentile(99) / 1e6),
    loopDelayMeanMs: ms(delay.mean / 1e6),
    loadavg: (await import("node:os")).loadavg().map((l) => Number(l.toFixed(1))),
  }),
);
if (flags.db === "postgres") await storage.em.getConnection().execute(`drop schema "${schema}" cascade`);
await storage.close();
rmSync(dir, { recursive: true, force: true });
