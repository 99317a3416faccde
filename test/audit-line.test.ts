import { closeSync, mkdtempSync, openSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { AccessLogWriter } from "../src/access-log.js";
import type { App } from "../src/app.js";
import { type AuditRecord, auditLineTo, createAuditLog } from "../src/audit.js";
import { createTestApp, DATABASES } from "./helpers.js";

const record: AuditRecord = {
  requestId: "0193a0a0-0000-7000-8000-000000000123",
  tenantId: "00000000-0000-7000-8000-000000000001",
  actorOutside: false,
  actorKind: "machine_user",
  actorId: "verifier",
  action: "credential.verify",
  targetId: null,
  outcome: "success",
  reason: "VALID",
  ip: "127.0.0.1",
};

/** An access log writer on a file of its own, and what it wrote once closed. */
function fileWriter(level: string) {
  const file = join(mkdtempSync(join(tmpdir(), "tessera-audit-line-")), "stderr");
  const fd = openSync(file, "a");
  const writer = new AccessLogWriter(level, fd);
  return {
    writer,
    async lines(): Promise<Record<string, unknown>[]> {
      await writer.close();
      closeSync(fd);
      const text = readFileSync(file, "utf8");
      return text === ""
        ? []
        : text
            .trimEnd()
            .split("\n")
            .map((l) => JSON.parse(l) as Record<string, unknown>);
    },
  };
}

/** A pino logger that keeps its lines. */
function keptLogger() {
  const lines: string[] = [];
  const logger = pino({ level: "info" }, { write: (line: string) => lines.push(line) });
  return { logger, lines };
}

describe("the audit log's lines", () => {
  it("go through the buffered writer in the service logger's format, not through the logger", async () => {
    const out = fileWriter("info");
    const { logger, lines } = keptLogger();
    const audit = createAuditLog({
      events: { insert: async () => undefined, deleteBefore: async () => 0 },
      logger,
      flushMs: 60_000,
      line: auditLineTo(out.writer),
    });
    audit.record(record);
    await audit.close();
    const written = await out.lines();
    expect(written).toHaveLength(1);
    expect(written[0]).toMatchObject({ level: 30, service: "tessera", msg: "audit", audit: record });
    expect(typeof written[0]!.time).toBe("number");
    expect(lines.filter((l) => l.includes('"msg":"audit"'))).toEqual([]);
  });

  it("are not written when the level is above info, and follow a level changed later", async () => {
    const out = fileWriter("warn");
    const line = auditLineTo(out.writer);
    line(record);
    out.writer.level = "info";
    line({ ...record, requestId: "after" });
    const written = await out.lines();
    expect(written.map((l) => (l.audit as AuditRecord).requestId)).toEqual(["after"]);
  });

  it("go through the logger when no writer is given", async () => {
    const { logger, lines } = keptLogger();
    const audit = createAuditLog({
      events: { insert: async () => undefined, deleteBefore: async () => 0 },
      logger,
      flushMs: 60_000,
    });
    audit.record(record);
    await audit.close();
    const audits = lines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l.msg === "audit");
    expect(audits).toHaveLength(1);
    expect(audits[0]!.audit).toEqual(record);
  });
});

describe.each(DATABASES)("an app with tessera serve's access log ($name)", (db) => {
  let app: App | undefined;
  afterEach(async () => {
    await app?.close();
    app = undefined;
  });

  it("writes each audit record's line with the access lines, and the event to the table", async () => {
    const out = fileWriter("info");
    const { logger, lines } = keptLogger();
    app = await createTestApp(db, {}, { accessLog: out.writer, logger });
    const requestId = `audit-line-${Date.now().toString(36)}`;
    app.audit.record({ ...record, requestId });
    await app.audit.flush();
    const stored = await app.sql.all<{ n: number | string }>(
      "select count(*) as n from audit_events where request_id = ?",
      [requestId],
    );
    expect(Number(stored[0]!.n)).toBe(1);
    const written = await out.lines();
    expect(written.filter((l) => l.msg === "audit").map((l) => (l.audit as AuditRecord).requestId)).toEqual([
      requestId,
    ]);
    expect(lines.filter((l) => l.includes(requestId))).toEqual([]);
  });
});
