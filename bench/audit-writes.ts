// Audit writes, side by side in one run: the buffered log's multi-row inserts against one
// insert per event (what src/audit.ts did before), on SQLite (a file) and PostgreSQL.
// Run: npx tsx bench/audit-writes.ts [events] [rounds]
import { randomUUID } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { type AuditRecord, createAuditLog } from "../src/audit.js";
import { initORM } from "../src/storage/orm.js";
import { AuditEventRepository } from "../src/storage/repositories/audit.js";
import { createSqlRunner, type SqlRunner } from "../src/storage/sql.js";

const EVENTS = Number(process.argv[2] ?? 5000);
const ROUNDS = Number(process.argv[3] ?? 2);
const logger = pino({ level: "silent" });
const entry: AuditRecord = {
  requestId: randomUUID(),
  tenantId: randomUUID(),
  actorOutside: false,
  actorKind: "user",
  actorId: randomUUID(),
  action: "tessera.v1.TokenService/CreatePersonalAccessToken",
  targetId: null,
  outcome: "success",
  reason: null,
  ip: "127.0.0.1",
};

async function batched(sql: SqlRunner): Promise<number> {
  const audit = createAuditLog({
    events: new AuditEventRepository(sql),
    logger,
    bufferSize: EVENTS,
    flushMs: 60_000,
  });
  const start = performance.now();
  for (let i = 0; i < EVENTS; i++) audit.record(entry);
  await audit.flush();
  while (audit.stats().depth > 0) await audit.flush();
  const ms = performance.now() - start;
  await audit.close();
  return ms;
}

async function perRow(sql: SqlRunner): Promise<number> {
  const start = performance.now();
  for (let i = 0; i < EVENTS; i++)
    await sql.run(
      "insert into audit_events (id, at, request_id, tenant_id, actor_kind, actor_id, action, target_id, outcome, reason, ip) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      [
        randomUUID(),
        new Date(),
        entry.requestId,
        entry.tenantId,
        entry.actorKind,
        entry.actorId,
        entry.action,
        null,
        entry.outcome,
        null,
        entry.ip,
      ],
    );
  return performance.now() - start;
}

const schema = `bench_audit_${Date.now().toString(36)}`;
const targets = [
  ["SQLite (file, WAL)", `sqlite:${join(mkdtempSync(join(tmpdir(), "tessera-bench-audit-")), "t.db")}`],
  ["PostgreSQL", `postgres://postgres@127.0.0.1:5432/test?schema=${schema}`],
] as const;
console.log(`| database | round | multi-row (events/s) | one insert per event (events/s) | ratio |`);
console.log(`| --- | ---: | ---: | ---: | ---: |`);
for (const [name, url] of targets) {
  const storage = await initORM({ url });
  try {
    const sql = await createSqlRunner(storage);
    for (let round = 1; round <= ROUNDS; round++) {
      const a = await batched(sql);
      const b = await perRow(sql);
      const rate = (ms: number) => Math.round((EVENTS / ms) * 1000);
      console.log(`| ${name} | ${round} | ${rate(a)} | ${rate(b)} | ${(b / a).toFixed(1)}× |`);
    }
  } finally {
    if (url.startsWith("postgres"))
      await storage.em.getConnection().execute(`drop schema "${schema}" cascade`);
    await storage.close();
  }
}
