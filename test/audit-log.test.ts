import { randomUUID } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import { type AuditRecord, createAuditLog } from "../src/audit.js";
import { LastUsedTracker } from "../src/auth/last-used.js";
import { createMetrics } from "../src/metrics.js";
import { AuditEventRepository } from "../src/storage/repositories/audit.js";
import { CredentialRepository } from "../src/storage/repositories/credentials.js";
import { toMillis } from "../src/storage/sql.js";
import { createTestApp, DATABASES, SQLITE } from "./helpers.js";
import { capturingLogger, type OutageApp, startOutageApp } from "./outage-helpers.js";

/** A record as the audit interceptor makes it, under a request id of the test's. */
function record(requestId: string, action = "tessera.v1.UserService/Login"): AuditRecord {
  return {
    requestId,
    tenantId: null,
    actorOutside: false,
    actorKind: "anonymous",
    actorId: null,
    action,
    targetId: null,
    outcome: "failure",
    reason: "CREDENTIALS_INVALID",
    ip: "127.0.0.1",
  };
}

async function until(check: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe.each(DATABASES)("the audit log and last-used times through a database outage ($name)", (db) => {
  let env: OutageApp | undefined;
  afterEach(async () => {
    await env?.close();
    env = undefined;
  });

  const countRows = async (prefix: string) => {
    const rows = await env!.app.sql.all<{ n: number | string }>(
      "select count(*) as n from audit_events where request_id like ?",
      [`${prefix}%`],
    );
    return Number(rows[0]!.n);
  };

  it("keeps every event recorded during the outage and writes them all once the database is back", async () => {
    env = await startOutageApp(db.name);
    const { logger, log } = capturingLogger();
    const audit = createAuditLog({
      events: new AuditEventRepository(env.app.sql),
      logger,
      flushMs: 20,
      minBackoffMs: 20,
      maxBackoffMs: 100,
    });
    const prefix = `outage-${randomUUID().slice(0, 8)}-`;
    await env.cut();
    for (let i = 0; i < 300; i++) audit.record(record(`${prefix}${i}`));
    await audit.flush();
    await until(() => audit.stats().failures >= 3);
    expect(audit.stats().depth).toBeGreaterThan(0);
    expect(audit.stats().dropped).toBe(0);
    // Logged once, however many retries failed.
    expect(log.count("audit events cannot be written; kept in memory and retried")).toBe(1);
    await env.restore();
    await until(() => audit.stats().depth === 0);
    expect(await countRows(prefix)).toBe(300);
    expect(audit.stats()).toMatchObject({ depth: 0, dropped: 0, written: 300 });
    expect(log.count("audit events are written again")).toBe(1);
    await audit.close();
  });

  it("counts and logs once the events an overflowing buffer drops, and writes the rest", async () => {
    env = await startOutageApp(db.name);
    const { logger, log } = capturingLogger();
    const audit = createAuditLog({
      events: new AuditEventRepository(env.app.sql),
      logger,
      bufferSize: 250,
      flushMs: 20,
      minBackoffMs: 20,
      maxBackoffMs: 50,
    });
    const prefix = `overflow-${randomUUID().slice(0, 8)}-`;
    await env.cut();
    for (let i = 0; i < 400; i++) audit.record(record(`${prefix}${i}`));
    await audit.flush();
    expect(audit.stats()).toMatchObject({ depth: 250, dropped: 150, written: 0 });
    expect(log.count(/^audit buffer full/)).toBe(1);
    await env.restore();
    await until(() => audit.stats().depth === 0);
    expect(await countRows(prefix)).toBe(250);
    expect(audit.stats()).toMatchObject({ depth: 0, dropped: 150, written: 250 });
    // What an operator sees: the scrape says exactly how many were lost and written.
    const metrics = createMetrics({ sql: env.app.sql, audit, limits: undefined, storage: env.app.storage });
    const scraped = await metrics.registry.metrics();
    expect(scraped).toMatch(/^tessera_audit_dropped_total 150$/m);
    expect(scraped).toMatch(/^tessera_audit_written_total 250$/m);
    expect(scraped).toMatch(/^tessera_audit_buffer_depth 0$/m);
    await audit.close();
  });

  it("writes at close what is buffered, retrying until the database is back", async () => {
    env = await startOutageApp(db.name);
    const { logger } = capturingLogger();
    const audit = createAuditLog({
      events: new AuditEventRepository(env.app.sql),
      logger,
      flushMs: 60_000,
      minBackoffMs: 20,
    });
    const prefix = `close-${randomUUID().slice(0, 8)}-`;
    await env.cut();
    for (let i = 0; i < 300; i++) audit.record(record(`${prefix}${i}`));
    await audit.flush();
    const restored = new Promise<void>((resolve) => setTimeout(() => void env!.restore().then(resolve), 300));
    await audit.close(5000);
    await restored;
    expect(await countRows(prefix)).toBe(300);
  });

  it("keeps a last-used time whose flush fell in the outage, and writes it afterwards", async () => {
    env = await startOutageApp(db.name);
    const { logger, log } = capturingLogger();
    const { app } = env;
    const user = await app.sql.get<{ id: string; tenant_id: string }>(
      "select id, tenant_id from users where username = 'admin'",
    );
    const tokenId = randomUUID();
    const now = new Date();
    await app.sql.run(
      "insert into api_tokens (id, public_id, kind, tenant_id, owner_user_id, name, scopes, secret_hash, hint, created_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      [
        tokenId,
        tokenId.slice(0, 16),
        "pat",
        user!.tenant_id,
        user!.id,
        "outage",
        "",
        "unused",
        "tsr_pat_…abcd",
        now,
      ],
    );
    const tracker = new LastUsedTracker(new CredentialRepository(app.sql), logger, 60, {
      minBackoffMs: 20,
      maxBackoffMs: 50,
    });
    const used = new Date(now.getTime() + 1000);
    await env.cut();
    tracker.mark("api_tokens", tokenId, used);
    expect(await tracker.flush()).toBe(false);
    expect(tracker.stats()).toMatchObject({ depth: 1, dropped: 0 });
    expect(await tracker.flush()).toBe(false);
    expect(log.count("last-used times cannot be written; kept and retried")).toBe(1);
    // Past its bound (here the one waiting and one more) a use is dropped: counted, logged once.
    const bounded = new LastUsedTracker(new CredentialRepository(app.sql), logger, 60, { maxPending: 2 });
    for (let i = 0; i < 5; i++) bounded.mark("api_tokens", randomUUID(), used);
    expect(bounded.stats()).toMatchObject({ depth: 2, dropped: 3 });
    expect(log.count(/^last-used buffer full/)).toBe(1);
    const scraped = await createMetrics({
      sql: app.sql,
      audit: app.audit,
      lastUsed: bounded,
      limits: undefined,
      storage: app.storage,
    }).registry.metrics();
    expect(scraped).toMatch(/^tessera_last_used_dropped_total 3$/m);
    expect(scraped).toMatch(/^tessera_last_used_buffer_depth 2$/m);
    await bounded.close();
    await env.restore();
    await until(async () => (await tracker.flush()) && tracker.stats().depth === 0);
    const row = await app.sql.get<{ last_used_at: unknown }>(
      "select last_used_at from api_tokens where id = ?",
      [tokenId],
    );
    expect(toMillis(row!.last_used_at)).toBe(used.getTime());
    await tracker.close();
  });

  it("deletes only events older than the retention period, in batches", async () => {
    env = await startOutageApp(db.name);
    const { logger } = capturingLogger();
    // Every delete the retention makes, with its size: batches of at most 3 rows, not one delete.
    const repository = new AuditEventRepository(env.app.sql);
    const deletes: number[] = [];
    const audit = createAuditLog({
      events: {
        insert: (rows) => repository.insert(rows),
        deleteBefore: async (cutoff, batch) => {
          expect(batch).toBe(3);
          const n = await repository.deleteBefore(cutoff, batch);
          deletes.push(n);
          return n;
        },
      },
      logger,
      retentionDays: 30,
      retentionBatch: 3,
    });
    const prefix = `retention-${randomUUID().slice(0, 8)}-`;
    const now = Date.now();
    const day = 86_400_000;
    const insert = (suffix: string, at: number) =>
      env!.app.sql.run(
        "insert into audit_events (id, at, request_id, actor_kind, action, outcome) values (?, ?, ?, ?, ?, ?)",
        [
          randomUUID(),
          new Date(at),
          `${prefix}${suffix}`,
          "anonymous",
          "tessera.v1.UserService/Login",
          "success",
        ],
      );
    for (let i = 0; i < 7; i++) await insert(`old-${i}`, now - 31 * day - i * 1000);
    await insert("edge", now - 29 * day);
    await insert("new", now - 1000);
    expect(await audit.purgeExpired(new Date(now))).toBeGreaterThanOrEqual(7);
    const left = await env.app.sql.all<{ request_id: string }>(
      "select request_id from audit_events where request_id like ? order by request_id",
      [`${prefix}%`],
    );
    expect(left.map((r) => r.request_id)).toEqual([`${prefix}edge`, `${prefix}new`]);
    // 7 old rows (and any older left by other tests) in deletes of at most 3, until one finds fewer.
    expect(deletes.length).toBeGreaterThanOrEqual(3);
    expect(Math.max(...deletes)).toBeLessThanOrEqual(3);
    expect(deletes.at(-1)).toBeLessThan(3);
    await audit.close();
    // And by itself, on its timer (the hourly period made short here): an expired row goes,
    // the rows within the period stay.
    await insert("late", now - 40 * day);
    const timed = createAuditLog({
      events: repository,
      logger,
      retentionDays: 30,
      retentionBatch: 3,
      retentionIntervalMs: 50,
    });
    const remaining = () =>
      env!.app.sql.all<{ request_id: string }>(
        "select request_id from audit_events where request_id like ? order by request_id",
        [`${prefix}%`],
      );
    await until(async () => (await remaining()).length === 2);
    expect((await remaining()).map((r) => r.request_id)).toEqual([`${prefix}edge`, `${prefix}new`]);
    await timed.close();
  });
});

describe("the last-used tracker's close", () => {
  it("writes the uses marked while its final write runs, the database being up", async () => {
    // Calls still ending at shutdown mark uses while close writes what was pending: those were
    // counted lost ("could not be written before shutdown") though the database answered.
    const app = await createTestApp(SQLITE);
    const { logger, log } = capturingLogger();
    try {
      const user = await app.sql.get<{ id: string; tenant_id: string }>(
        "select id, tenant_id from users where username = 'admin'",
      );
      const ids = [randomUUID(), randomUUID()];
      for (const id of ids)
        await app.sql.run(
          "insert into api_tokens (id, public_id, kind, tenant_id, owner_user_id, name, scopes, secret_hash, hint, created_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
          [
            id,
            id.slice(0, 16),
            "pat",
            user!.tenant_id,
            user!.id,
            "close",
            "",
            "unused",
            "tsr_pat_…abcd",
            new Date(),
          ],
        );
      const credentials = new CredentialRepository(app.sql);
      const used = new Date(Date.now() + 1000);
      let tracker: LastUsedTracker | undefined;
      // The real repository; its first write lets a call end (and mark a use) meanwhile.
      const during = Object.assign(Object.create(credentials) as CredentialRepository, {
        markUsed: async (...args: Parameters<CredentialRepository["markUsed"]>) => {
          if (args[1] === ids[0]) tracker!.mark("api_tokens", ids[1]!, used);
          return credentials.markUsed(...args);
        },
      });
      tracker = new LastUsedTracker(during, logger, 60);
      tracker.mark("api_tokens", ids[0]!, used);
      await tracker.close(5000);
      expect(tracker.stats()).toMatchObject({ depth: 0, dropped: 0, written: 2 });
      expect(log.count(/could not be written before shutdown/)).toBe(0);
      for (const id of ids) {
        const row = await app.sql.get<{ last_used_at: unknown }>(
          "select last_used_at from api_tokens where id = ?",
          [id],
        );
        expect(toMillis(row!.last_used_at)).toBe(used.getTime());
      }
    } finally {
      await app.close();
    }
  });
});

describe("the audit log's close", () => {
  it("writes an event recorded as its final write ends, the database being up", async () => {
    // An event recorded a few microtasks after the last insert resolved (a call ending as
    // the write did), before close ended, found the pump done and nothing writing the buffer
    // any more: close counted it lost ("could not be written before shutdown") though the
    // database was up. Every such moment, one per log.
    const app = await createTestApp(SQLITE);
    const { logger, log } = capturingLogger();
    const real = new AuditEventRepository(app.sql);
    try {
      for (let depth = 1; depth <= 8; depth++) {
        let audit: ReturnType<typeof createAuditLog> | undefined;
        let first = true;
        // The real repository; its first insert lets a call end `depth` microtasks after it.
        const events = Object.assign(Object.create(real) as AuditEventRepository, {
          insert: async (...args: Parameters<AuditEventRepository["insert"]>) => {
            const written = await real.insert(...args);
            if (first) {
              first = false;
              let later: Promise<unknown> = Promise.resolve();
              for (let i = 0; i < depth; i++) later = later.then(() => undefined);
              void later.then(() => audit!.record(record(`ending-${depth}-${randomUUID().slice(0, 8)}`)));
            }
            return written;
          },
        });
        audit = createAuditLog({ events, logger, flushMs: 60_000 });
        audit.record(record(`closing-${depth}-${randomUUID().slice(0, 8)}`));
        await audit.close(5000);
        await new Promise((resolve) => setImmediate(resolve));
        // Written, or (once close has ended) dropped as recorded after it: never lost by close.
        const { written, dropped } = audit.stats();
        expect(written + dropped, `an event ${depth} microtasks after the write`).toBe(2);
        expect(log.count(/could not be written before shutdown/), `an event ${depth} microtasks after`).toBe(
          0,
        );
      }
    } finally {
      await app.close();
    }
  });
});

describe("an event recorded after the audit log closed", () => {
  it("is counted as dropped and logged, not left in a buffer nothing writes any more (last-used times too)", async () => {
    // A call cut at shutdown (after the grace period) still ends, and records, after the app
    // closed its audit log: that record can no longer be written, and must not be lost silently.
    const app = await createTestApp(SQLITE);
    const { logger, log } = capturingLogger();
    const audit = createAuditLog({ events: new AuditEventRepository(app.sql), logger, flushMs: 20 });
    try {
      audit.record(record(`before-close-${randomUUID().slice(0, 8)}`));
      await audit.close();
      expect(audit.stats()).toMatchObject({ depth: 0, dropped: 0, written: 1 });
      audit.record(record(`after-close-${randomUUID().slice(0, 8)}`));
      audit.record(record(`after-close-${randomUUID().slice(0, 8)}`));
      expect(audit.stats()).toMatchObject({ depth: 0, dropped: 2, written: 1 });
      expect(log.count(/^audit event recorded after the audit log closed/)).toBe(1);
      // The last-used times likewise.
      const tracker = new LastUsedTracker(new CredentialRepository(app.sql), logger, 60);
      await tracker.close();
      tracker.mark("api_tokens", randomUUID());
      tracker.mark("api_tokens", randomUUID());
      expect(tracker.stats()).toMatchObject({ depth: 0, dropped: 2 });
      expect(log.count(/^last-used time marked after the tracker closed/)).toBe(1);
    } finally {
      await app.close();
    }
  });
});
