import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { WatchRevocationsResponseSchema } from "../gen/tessera/v1/verification_service_pb.js";
import type { TesseraLogger } from "../src/sdk/index.js";
import { AggregatedLog, type AggregateFields } from "../src/sdk/logger.js";
import { createTesseraAuth, type TesseraAuthError } from "../src/sdk/server/index.js";
import { RevocationWatch } from "../src/sdk/server/revocation-watch.js";
import { Session } from "../src/sdk/session.js";

/**
 * The SDK reports what it would otherwise drop silently through the logger it is given: the
 * revocation stream's state changes once each, and what a caller can cause per request
 * (verifications refused past maxConcurrentVerifications, VerifyCredential faults) as one
 * line per interval with its count, never a line per credential, and never a credential.
 */

interface Line {
  level: "warn" | "error" | "info";
  obj: Record<string, unknown>;
  msg: string;
}

function keptLogger(): TesseraLogger & { lines: Line[] } {
  const lines: Line[] = [];
  return {
    lines,
    warn: (obj, msg) => void lines.push({ level: "warn", obj: obj as Record<string, unknown>, msg }),
    error: (obj, msg) => void lines.push({ level: "error", obj: obj as Record<string, unknown>, msg }),
    info: (obj, msg) => void lines.push({ level: "info", obj: obj as Record<string, unknown>, msg }),
  };
}

const at = (lines: Line[], level: Line["level"]) => lines.filter((l) => l.level === level);

describe("the SDK's logger", () => {
  it("reports the revocation stream dropping with one warning, however many reconnections fail, and its return with one info", async () => {
    const logger = keptLogger();
    let opened = 0;
    let drop!: () => void;
    const dropped = new Promise<void>((resolve) => {
      drop = resolve;
    });
    const watch = new RevocationWatch({
      // 1: up, until dropped; 2-4: refused; 5: up for good.
      async *open(_cursor, signal) {
        opened++;
        if (opened >= 2 && opened <= 4) throw new ConnectError("connection refused", Code.Unavailable);
        yield create(WatchRevocationsResponseSchema, { cursor: `c${opened}`, heartbeatSeconds: 60 });
        if (opened === 1) {
          await dropped;
          throw new ConnectError("stream reset", Code.Unavailable);
        }
        await new Promise<void>((resolve) =>
          signal.addEventListener("abort", () => resolve(), { once: true }),
        );
      },
      now: Date.now,
      skewMs: 0,
      rememberMs: 60_000,
      onEvent: () => {},
      onLost: () => {},
      minBackoffMs: 1,
      maxBackoffMs: 2,
      logger,
    });
    try {
      expect(await watch.ready()).toBe(true);
      expect(at(logger.lines, "info")).toHaveLength(1);
      expect(at(logger.lines, "warn")).toHaveLength(0);
      drop();
      await expect.poll(() => opened, { timeout: 5000 }).toBe(5);
      await expect.poll(() => watch.healthy(), { timeout: 5000 }).toBe(true);
      const warnings = at(logger.lines, "warn");
      expect(warnings).toHaveLength(1);
      expect(warnings[0]!.msg).toMatch(/^revocation watch down/);
      expect(warnings[0]!.obj).toMatchObject({
        reason: "error",
        error: { message: expect.stringContaining("stream reset") },
      });
      const infos = at(logger.lines, "info");
      expect(infos).toHaveLength(2);
      expect(infos[1]!.msg).toMatch(/^revocation watch back up/);
    } finally {
      watch.close();
    }
    // Closing is not a loss to report.
    expect(at(logger.lines, "warn")).toHaveLength(1);
  });

  /** A core whose VerifyCredential calls `unary` answers; its clock at `clock.t`. */
  function core(unary: Transport["unary"], clock: { t: number }, logger: TesseraLogger) {
    return createTesseraAuth({
      server: "https://tessera.invalid",
      transport: { unary, stream: () => Promise.reject(new Error("no stream")) } as unknown as Transport,
      watch: false,
      maxConcurrentVerifications: 5,
      now: () => clock.t,
      logger,
    });
  }
  const made = () => `tsr_pat_${randomBytes(16).toString("hex")}`;

  it("reports a flood of verifications refused past maxConcurrentVerifications as one line per interval with its count, without a credential", async () => {
    const logger = keptLogger();
    const clock = { t: 1_000_000 };
    // Tessera never answers: the first five stay in flight, every other is refused at once.
    const auth = core(() => new Promise(() => {}), clock, logger);
    const sent: string[] = [];
    const flood = async (n: number) => {
      const outcomes = await Promise.allSettled(
        Array.from({ length: n }, () => {
          const credential = made();
          sent.push(credential);
          return Promise.race([
            auth.authenticate(`Bearer ${credential}`),
            new Promise((r) => setTimeout(r, 50)),
          ]);
        }),
      );
      return outcomes.filter(
        (o) => o.status === "rejected" && (o.reason as TesseraAuthError).reason === "UNAVAILABLE",
      ).length;
    };
    try {
      expect(await flood(300)).toBe(295);
      // Within the interval: not a line yet, and never one per refusal.
      expect(logger.lines).toHaveLength(0);
      clock.t += 10_000;
      expect(await flood(1)).toBe(1);
      expect(logger.lines).toHaveLength(1);
      expect(logger.lines[0]).toMatchObject({ level: "warn", obj: { count: 295, intervalMs: 10_000 } });
      expect(logger.lines[0]!.msg).toMatch(/maxConcurrentVerifications/);
      expect(auth.stats().verifyRefused).toBe(296);
    } finally {
      auth.close();
    }
    // The last interval's refusal is written at close, not lost.
    expect(logger.lines).toHaveLength(2);
    expect(logger.lines[1]!.obj).toMatchObject({ count: 1 });
    const text = JSON.stringify(logger.lines);
    for (const credential of sent) expect(text).not.toContain(credential.slice(0, 16));
    expect(text).not.toContain("tsr_pat_");
  });

  it("reports VerifyCredential faults as one error line per interval with the last fault, without a credential", async () => {
    const logger = keptLogger();
    const clock = { t: 1_000_000 };
    const auth = core(
      () => Promise.reject(new ConnectError("connect ECONNREFUSED", Code.Unavailable)),
      clock,
      logger,
    );
    const sent: string[] = [];
    try {
      for (let i = 0; i < 40; i++) {
        const credential = made();
        sent.push(credential);
        await expect(auth.authenticate(`Bearer ${credential}`)).rejects.toMatchObject({
          reason: "UNAVAILABLE",
        });
      }
      expect(logger.lines).toHaveLength(0);
      clock.t += 10_000;
      await expect(auth.authenticate(`Bearer ${made()}`)).rejects.toMatchObject({ reason: "UNAVAILABLE" });
      expect(logger.lines).toHaveLength(1);
      expect(logger.lines[0]).toMatchObject({
        level: "error",
        obj: { count: 40, lastError: { message: expect.stringContaining("ECONNREFUSED") } },
      });
    } finally {
      auth.close();
    }
    const text = JSON.stringify(logger.lines);
    for (const credential of sent) expect(text).not.toContain(credential.slice(0, 16));
  });

  it("reports a client's failing session renewals once, and the renewal that succeeds again, without a token", async () => {
    const logger = keptLogger();
    let fail = true;
    const session = new Session({
      accessToken: "old-access-token-secret",
      refreshToken: "refresh-token-secret",
      autoRefresh: true,
      refresh: async () => {
        if (fail) throw new ConnectError("Tessera unavailable", Code.Unavailable);
        return {
          accessToken: "new-access-token-secret",
          refreshToken: "new-refresh-token-secret",
          accessTokenExpiresAt: undefined,
          refreshTokenExpiresAt: undefined,
        };
      },
      logger,
    });
    for (let i = 0; i < 3; i++) await expect(session.refresh()).rejects.toBeInstanceOf(ConnectError);
    expect(logger.lines).toHaveLength(1);
    expect(logger.lines[0]).toMatchObject({ level: "warn", obj: { error: { code: Code.Unavailable } } });
    fail = false;
    await session.refresh();
    expect(logger.lines).toHaveLength(2);
    expect(logger.lines[1]).toMatchObject({ level: "info", obj: { failures: 3 } });
    expect(JSON.stringify(logger.lines)).not.toMatch(/secret/);
  });
});

describe("AggregatedLog", () => {
  it("counts events by key within an interval, in one line with the keys that had any, and none for events without a key", () => {
    const lines: AggregateFields<"a" | "b" | "c">[] = [];
    let t = 0;
    const log = new AggregatedLog<"a" | "b" | "c">(
      (fields) => lines.push(fields),
      () => t,
      1000,
    );
    log.add(undefined, "a");
    log.add({ name: "Error" }, "b");
    log.add(undefined, "a");
    expect(lines).toHaveLength(0);
    // The first event past the interval's end writes its line and starts the next.
    t = 1000;
    log.add(undefined, "c");
    expect(lines).toEqual([
      { count: 3, intervalMs: 1000, lastError: { name: "Error" }, counts: { a: 2, b: 1 } },
    ]);
    log.flush();
    expect(lines[1]).toEqual({ count: 1, intervalMs: 1000, counts: { c: 1 } });
    // An interval of events without a key: its count alone, as before keys.
    log.add();
    log.flush();
    expect(lines[2]).toEqual({ count: 1, intervalMs: 1000 });
    expect(lines).toHaveLength(3);
  });
});
