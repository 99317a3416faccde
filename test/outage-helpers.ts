import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { type App, createApp } from "../src/app.js";
import type { ConfigInput } from "../src/config.js";
import { DbProxy } from "./db-proxy.js";
import { dropSchema, testConfig } from "./helpers.js";
import { scannedSink } from "./log-scan-suite.js";

/** Log lines a test app wrote (parsed), to assert what was logged and how often. */
export interface CapturedLog {
  lines: Record<string, unknown>[];
  count(msg: string | RegExp): number;
}

/** A pino logger whose lines are kept in memory. */
export function capturingLogger(level = "info") {
  const log: CapturedLog = {
    lines: [],
    count: (msg) =>
      log.lines.filter((l) => (typeof msg === "string" ? l.msg === msg : msg.test(String(l.msg)))).length,
  };
  const logger = pino({ level }, scannedSink({ write: (s: string) => void log.lines.push(JSON.parse(s)) }));
  return { logger, log };
}

/**
 * An app whose database a test can take away and give back, on either database:
 * - PostgreSQL, through a {@link DbProxy} that resets every connection (the machine's
 *   PostgreSQL keeps running for everyone else);
 * - SQLite, embedded, has no connection to lose: its outage is the file system. `cut()`
 *   makes Tessera's connection read-only (`query_only`: every write fails with
 *   SQLITE_READONLY, as on a file system remounted read-only after an I/O error, or a
 *   volume whose permissions were lost) while reads keep working, as they do there. (A
 *   full disk fails only writes that need a new page, SQLITE_FULL; the same mapping
 *   covers it, see test/storage-errors.test.ts.)
 */
export interface OutageApp {
  app: App;
  log: CapturedLog;
  cut(): Promise<void>;
  /** PostgreSQL only: the database stops answering (bytes held, nothing refused or reset). */
  freeze?(): void;
  /** PostgreSQL only: the proxy between the app and PostgreSQL. */
  proxy?: DbProxy;
  restore(): Promise<void>;
  close(): Promise<void>;
}

export async function startOutageApp(
  kind: "sqlite" | "postgres",
  overrides: ConfigInput = {},
): Promise<OutageApp> {
  const { logger, log } = capturingLogger();
  if (kind === "postgres") {
    const proxy = await DbProxy.start();
    const schema = `t_${Date.now().toString(36)}_${randomBytes(4).toString("hex")}`;
    const url = proxy.url(schema);
    const app = await createApp(testConfig(url, overrides), { logger });
    return {
      app,
      log,
      proxy,
      async cut() {
        proxy.cut();
      },
      freeze() {
        proxy.freeze();
      },
      async restore() {
        proxy.restore();
      },
      async close() {
        proxy.restore();
        await app.close();
        await proxy.close();
        await dropSchema(url);
      },
    };
  }
  const dir = mkdtempSync(join(tmpdir(), "tessera-outage-"));
  const app = await createApp(testConfig(`sqlite:${join(dir, "tessera.db")}`, overrides), { logger });
  const conn = app.storage.em.getConnection();
  const pragma = (sql: string) => conn.execute(sql);
  return {
    app,
    log,
    async cut() {
      await pragma("pragma query_only = 1");
    },
    async restore() {
      await pragma("pragma query_only = 0");
    },
    async close() {
      await app.close();
    },
  };
}
