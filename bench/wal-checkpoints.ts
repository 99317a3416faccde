// Where SQLite's WAL checkpoints run: inside the server connection's commits (SQLite's
// automatic checkpoint, `--auto`, what the server did before) or on the checkpoint thread
// (src/storage/sqlite-checkpointer.ts, the default). Writes 64-row audit batches with a
// pause between them (as the audit log does under load) and prints the insert times.
// Wall-clock is the machine's: count the event loop's fsyncs instead, which do not depend
// on the load:
//   strace -f -e trace=fsync,fdatasync,access,faccessat,faccessat2 -o trace.txt npx tsx bench/wal-checkpoints.ts [--auto]
//   then the fsyncs of the printed pid (the event loop's thread) between the two checks of
//   /tmp/.tessera-wal-marker, which mark the start and end of the writes.
// Run: npx tsx bench/wal-checkpoints.ts [--auto] [--batches 400] [--gap-ms 5]
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { initORM } from "../src/storage/orm.js";
import { AuditEventRepository, type AuditEventRow } from "../src/storage/repositories/audit.js";
import { createSqlRunner } from "../src/storage/sql.js";
import { uuidV7 } from "../src/storage/uuid-v7.js";

const { values: flags } = parseArgs({
  options: {
    auto: { type: "boolean", default: false },
    batches: { type: "string", default: "400" },
    "gap-ms": { type: "string", default: "5" },
  },
});
const dir = mkdtempSync(join(tmpdir(), "tessera-wal-"));
const storage = await initORM({ url: `sqlite:${join(dir, "t.db")}` });
const sql = await createSqlRunner(storage);
// SQLite's default: a checkpoint inside the commit that takes the WAL past 1,000 pages.
if (flags.auto) await sql.run("pragma wal_autocheckpoint = 1000");
const repo = new AuditEventRepository(sql);
const tenant = randomUUID();
const actor = randomUUID();
const times: number[] = [];
existsSync("/tmp/.tessera-wal-marker");
for (let b = 0; b < Number(flags.batches); b++) {
  const rows: AuditEventRow[] = Array.from({ length: 64 }, () => {
    const now = Date.now();
    return {
      id: uuidV7(now),
      at: new Date(now),
      requestId: uuidV7(now),
      tenantId: tenant,
      actorOutside: false,
      actorKind: "machine_user",
      actorId: actor,
      action: "credential.verify",
      targetId: actor,
      outcome: "success",
      reason: "VALID",
      ip: "127.0.0.1",
    };
  });
  const start = performance.now();
  await repo.insert(rows);
  times.push(performance.now() - start);
  await new Promise((r) => setTimeout(r, Number(flags["gap-ms"])));
}
existsSync("/tmp/.tessera-wal-marker");
const sorted = [...times].sort((a, b) => a - b);
const q = (p: number) => Number(sorted[Math.floor(p * (sorted.length - 1))]!.toFixed(2));
console.log(
  JSON.stringify({
    pid: process.pid,
    checkpoints: flags.auto ? "in commits" : "thread",
    batches: times.length,
    insertMsP50: q(0.5),
    insertMsP99: q(0.99),
    insertMsMax: q(1),
    over20ms: times.filter((t) => t > 20).length,
    walBytes: statSync(join(dir, "t.db-wal")).size,
  }),
);
await storage.close();
rmSync(dir, { recursive: true, force: true });
