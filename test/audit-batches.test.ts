import { afterEach, describe, expect, it } from "vitest";
import type { App } from "../src/app.js";
import { type AuditRecord, createAuditLog } from "../src/audit.js";
import {
  AuditEventRepository,
  type AuditEventRow,
  MAX_AUDIT_BATCH,
  SYNC_AUDIT_BATCH,
} from "../src/storage/repositories/audit.js";
import { uuidV7 } from "../src/storage/uuid-v7.js";
import { createTestApp, DATABASES, silentLogger } from "./helpers.js";

const UUID_V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

function verification(requestId: string): AuditRecord {
  return {
    requestId,
    tenantId: null,
    actorOutside: false,
    actorKind: "machine_user",
    actorId: "verifier",
    action: "credential.verify",
    targetId: null,
    outcome: "success",
    reason: "VALID",
    ip: "verify:machine_user:verifier",
  };
}

describe("time-ordered ids (uuidV7)", () => {
  it("makes RFC 9562 version-7 ids that sort in the order they were made, within one millisecond too", () => {
    const at = Date.UTC(2026, 11, 5, 11, 0, 0);
    // More than the 4096 a millisecond's counter holds: the next ones borrow the next millisecond.
    const ids = Array.from({ length: 10_000 }, () => uuidV7(at));
    for (const id of ids) expect(id).toMatch(UUID_V7);
    expect(new Set(ids).size).toBe(ids.length);
    expect([...ids].sort()).toEqual(ids);
    // The first 48 bits are the Unix milliseconds.
    expect(Number.parseInt(ids[0]!.replace("-", "").slice(0, 12), 16)).toBe(at);
    // A clock that steps back does not reorder them.
    const later = uuidV7(at - 60_000);
    expect(later > ids.at(-1)!).toBe(true);
  });
});

describe.each(DATABASES)("the audit log's writes ($name)", (db) => {
  let app: App | undefined;
  afterEach(async () => {
    await app?.close();
    app = undefined;
  });

  it("writes bounded batches, one per event-loop turn, under time-ordered ids, and loses none", async () => {
    app = await createTestApp(db);
    const repository = new AuditEventRepository(app.sql);
    // SQLite (better-sqlite3) writes in the calling turn: small batches; PostgreSQL: the statement's bound.
    expect(repository.batchRows).toBe(db.name === "sqlite" ? SYNC_AUDIT_BATCH : MAX_AUDIT_BATCH);
    const inserts: AuditEventRow[][] = [];
    /** Per insert: whether a macrotask queued right after the previous insert had run by then. */
    const turnsBetween: boolean[] = [];
    let turned = true;
    const audit = createAuditLog({
      events: {
        batchRows: repository.batchRows,
        insert: (rows) => {
          turnsBetween.push(turned);
          turned = false;
          setImmediate(() => {
            turned = true;
          });
          inserts.push([...rows]);
          return repository.insert(rows);
        },
        deleteBefore: (cutoff, batch) => repository.deleteBefore(cutoff, batch),
      },
      logger: silentLogger,
      flushMs: 60_000,
    });
    const n = 3 * MAX_AUDIT_BATCH + 7;
    const prefix = `batches-${Date.now().toString(36)}-`;
    for (let i = 0; i < n; i++) audit.record(verification(`${prefix}${i}`));
    await audit.flush();
    while (audit.stats().depth > 0) await audit.flush();

    expect(audit.stats()).toMatchObject({ depth: 0, dropped: 0, written: n });
    expect(Math.max(...inserts.map((b) => b.length))).toBeLessThanOrEqual(repository.batchRows);
    // On SQLite a batch is time no request is answered: at most 16 rows in one synchronous step.
    if (db.name === "sqlite") expect(Math.max(...inserts.map((b) => b.length))).toBeLessThanOrEqual(16);
    // Every insert after the first of a flush came in a later turn than the one before it.
    expect(turnsBetween.every(Boolean)).toBe(true);
    // Ids in the order the events were recorded: each insert appends to the primary key's index.
    const ids = inserts.flat().map((r) => r.id);
    for (const id of ids) expect(id).toMatch(UUID_V7);
    expect([...ids].sort()).toEqual(ids);
    const stored = await app.sql.all<{ n: number | string }>(
      "select count(*) as n from audit_events where request_id like ?",
      [`${prefix}%`],
    );
    expect(Number(stored[0]!.n)).toBe(n);
    await audit.close();
  });
});
