import { spawn } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { pino } from "pino";
import { describe, expect, it, vi } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type AccessLog, AccessLogWriter, accessLogOf, accessLogStats } from "../src/access-log.js";
import { createCallObserver } from "../src/call-observer.js";
import type { RequestState } from "../src/context.js";

/**
 * A gate on libuv's thread-pool writes (node:fs `write`, what the access log uses on a file):
 * while set, each write waits for it, as a write to a slow or hung disk does. Unset, writes
 * pass straight through. `written`, when set, is told after each write's callback has run.
 */
const fsGate = vi.hoisted(() => ({
  hold: undefined as undefined | ((release: () => void) => void),
  written: undefined as undefined | (() => void),
}));
vi.mock("node:fs", async (importOriginal) => {
  const fs = await importOriginal<typeof import("node:fs")>();
  const write = ((...args: unknown[]) => {
    const callback = args.at(-1) as (...result: unknown[]) => void;
    const told = (...result: unknown[]) => {
      callback(...result);
      fsGate.written?.();
    };
    const go = () => (fs.write as (...a: unknown[]) => void)(...args.slice(0, -1), told);
    if (fsGate.hold) fsGate.hold(go);
    else go();
  }) as typeof fs.write;
  return { ...fs, default: { ...fs, write }, write };
});

const ACCESS_LOG = fileURLToPath(new URL("../src/access-log.ts", import.meta.url));
const prefixes = { pat: "tsr_pat_", apiKey: "tsr_key_", machine: "tsr_mu_" };

/** Lines of every length around the 4 KiB chunk, multi-byte characters among them. */
function sampleLines(n: number): string[] {
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    const filler = i % 7 === 0 ? "é€😀".repeat(i % 50) : "x".repeat((i * 37) % 600);
    lines.push(`${JSON.stringify({ i, filler })}\n`);
  }
  // Longer than a chunk: written as one piece.
  lines.push(`${JSON.stringify({ long: "y".repeat(10_000) })}\n`);
  lines.push(`${JSON.stringify({ long: "😀".repeat(3_000) })}\n`);
  return lines;
}

describe("the access log writer", () => {
  it("writes every line once, whole and in order, across chunk boundaries and multi-byte characters", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-access-"));
    const file = join(dir, "access.log");
    const fd = openSync(file, "a");
    const log = new AccessLogWriter("info", fd);
    const lines = sampleLines(5_000);
    try {
      for (let i = 0; i < lines.length; i++) {
        log.writeLine(lines[i]!);
        // Turns of the event loop, as between calls: asynchronous writes complete meanwhile.
        if (i % 50 === 0) await new Promise(setImmediate);
      }
      await log.close();
      expect(readFileSync(file, "utf8")).toBe(lines.join(""));
    } finally {
      closeSync(fd);
    }
  });

  it("copies the lines its caller marks ASCII byte for byte, across chunk boundaries, among lines that are not", async () => {
    const file = join(mkdtempSync(join(tmpdir(), "tessera-access-")), "access.log");
    const fd = openSync(file, "a");
    const log = new AccessLogWriter("info", fd);
    const lines = sampleLines(5_000);
    try {
      for (let i = 0; i < lines.length; i++) {
        log.writeLine(lines[i]!, /^[ -~\n]*$/.test(lines[i]!));
        if (i % 50 === 0) await new Promise(setImmediate);
      }
      await log.close();
      expect(readFileSync(file, "utf8")).toBe(lines.join(""));
    } finally {
      closeSync(fd);
    }
  });

  it("keeps the order when closed while a write is slow: the rest follows it once it lands", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-access-"));
    const file = join(dir, "access.log");
    const fd = openSync(file, "a");
    const log = new AccessLogWriter("info", fd);
    const lines = sampleLines(400);
    try {
      // Every write takes 150 ms; close waits for the one under way (longer than 150 ms).
      fsGate.hold = (go) => setTimeout(go, 150);
      for (const line of lines) log.writeLine(line);
      log.flush(); // the first chunk's write is under way, the others wait
      await log.close(2_000);
      fsGate.hold = undefined;
      expect(readFileSync(file, "utf8")).toBe(lines.join(""));
    } finally {
      fsGate.hold = undefined;
      closeSync(fd);
    }
  });

  it("never writes later lines ahead of a write that outlasts close: they are dropped and counted", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-access-"));
    const file = join(dir, "access.log");
    const fd = openSync(file, "a");
    const log = new AccessLogWriter("info", fd);
    const lines = sampleLines(400);
    const droppedBefore = accessLogStats.dropped;
    let release: (() => void) | undefined;
    try {
      // A hung disk: the first write does not come back until the test lets it.
      fsGate.hold = (go) => {
        release = go;
      };
      for (const line of lines) log.writeLine(line);
      log.flush();
      const started = performance.now();
      await log.close(100);
      expect(performance.now() - started, "close waits a bounded time").toBeLessThan(1_500);
      fsGate.hold = undefined;
      expect(readFileSync(file, "utf8"), "nothing written ahead of the write under way").toBe("");
      // The write under way lands when the disk lets it, not by some time after.
      const writeLanded = new Promise<void>((resolve) => {
        fsGate.written = resolve;
      });
      release!();
      await writeLanded;
      const got = readFileSync(file, "utf8");
      expect(got.length).toBeGreaterThan(0);
      expect(lines.join("").startsWith(got), "what landed is the first lines, in order").toBe(true);
      const landed = got.split("\n").length - 1;
      expect(accessLogStats.dropped - droppedBefore).toBe(lines.length - landed);
    } finally {
      fsGate.hold = undefined;
      fsGate.written = undefined;
      closeSync(fd);
    }
  });

  it("writes what it holds within a fraction of a second when calls are few", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-access-"));
    const file = join(dir, "access.log");
    const fd = openSync(file, "a");
    const log = new AccessLogWriter("info", fd);
    try {
      log.writeLine('{"one":1}\n');
      const deadline = Date.now() + 2_000;
      while (readFileSync(file, "utf8") === "" && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 20));
      expect(readFileSync(file, "utf8")).toBe('{"one":1}\n');
    } finally {
      await log.close();
      closeSync(fd);
    }
  });

  it("writes full chunks in bursts of 16, back to back, each at most PIPE_BUF bytes and ending at a line's end", async () => {
    const writes: { at: number; chunk: Buffer }[] = [];
    let turn = 0;
    const sink = {
      write(chunk: Buffer, done: (err?: Error | null) => void) {
        writes.push({ at: turn, chunk: Buffer.from(chunk) });
        queueMicrotask(() => done(null));
        return true;
      },
      on() {
        return sink;
      },
    };
    const log = new AccessLogWriter("info", 2, undefined, sink);
    try {
      const line = `${JSON.stringify({ pad: "x".repeat(300) })}\n`;
      const perChunk = Math.floor(4096 / line.length);
      // Fifteen full chunks and a line into the sixteenth: nothing written yet.
      for (let i = 0; i < 15 * perChunk + 1; i++) log.writeLine(line);
      await new Promise((r) => setImmediate(r));
      expect(writes).toHaveLength(0);
      // The line that fills the sixteenth seals it: the sixteen go out in one turn.
      turn = 1;
      for (let i = 0; i < perChunk; i++) log.writeLine(line);
      await new Promise((r) => setImmediate(r));
      expect(writes).toHaveLength(16);
      expect(new Set(writes.map((w) => w.at))).toEqual(new Set([1]));
      for (const { chunk } of writes) {
        expect(chunk.length).toBeLessThanOrEqual(4096);
        expect(chunk.at(-1)).toBe(10);
      }
      expect(Buffer.concat(writes.map((w) => w.chunk)).toString()).toBe(line.repeat(16 * perChunk));
    } finally {
      await log.close();
    }
  });

  it("fills a chunk again only after its write has landed, each byte handed to stderr left as it was", async () => {
    const lines = sampleLines(3_000);
    const landed: Buffer[] = [];
    const changed: number[] = [];
    const stores = new Set<ArrayBufferLike>();
    let writes = 0;
    const sink = {
      write(chunk: Buffer, done: (err?: Error | null) => void) {
        const n = writes++;
        const copy = Buffer.from(chunk);
        stores.add(chunk.buffer);
        // A slow reader: the write lands a turn later, while calls keep adding lines.
        setImmediate(() => {
          if (!chunk.equals(copy)) changed.push(n);
          landed.push(copy);
          done(null);
        });
        return true;
      },
      on() {
        return sink;
      },
    };
    // What close writes synchronously, after the last asynchronous write, goes to the file.
    const file = join(mkdtempSync(join(tmpdir(), "tessera-access-")), "access.log");
    const fd = openSync(file, "a");
    const log = new AccessLogWriter("info", fd, undefined, sink);
    try {
      for (let i = 0; i < lines.length; i++) {
        log.writeLine(lines[i]!);
        if (i % 3 === 0) await new Promise(setImmediate);
        if (i % 400 === 0) log.flush();
      }
      await log.close();
      expect(changed, "chunks changed between their write and its landing").toEqual([]);
      expect(Buffer.concat(landed).toString("utf8") + readFileSync(file, "utf8")).toBe(lines.join(""));
      // The chunks were filled again (the two lines longer than a chunk are buffers of their own).
      expect(writes).toBeGreaterThan(100);
      expect(stores.size).toBeLessThanOrEqual(16 + 2 + 2);
    } finally {
      await log.close();
      closeSync(fd);
    }
  });

  it("follows its level like a logger (SIGHUP changes it)", async () => {
    const log = new AccessLogWriter("info", 2);
    try {
      expect(log.isLevelEnabled("info")).toBe(true);
      expect(log.isLevelEnabled("debug")).toBe(false);
      log.level = "warn";
      expect(log.isLevelEnabled("info")).toBe(false);
      log.level = "debug";
      expect(log.isLevelEnabled("debug")).toBe(true);
    } finally {
      await log.close();
    }
  });

  it("flushes at process exit without being closed", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-access-"));
    const file = join(dir, "access.log");
    const script = `
      const { openSync } = await import("node:fs");
      const { AccessLogWriter } = await import(${JSON.stringify(ACCESS_LOG)});
      const log = new AccessLogWriter("info", openSync(${JSON.stringify(file)}, "a"));
      for (let i = 0; i < 20_000; i++) log.writeLine(JSON.stringify({ i }) + "\\n");
      process.exit(0);
    `;
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      stdio: "ignore",
    });
    expect(await new Promise((r) => child.on("exit", r))).toBe(0);
    const got = readFileSync(file, "utf8").trimEnd().split("\n");
    expect(got).toHaveLength(20_000);
    expect(got.map((l) => (JSON.parse(l) as { i: number }).i)).toEqual([...Array(20_000).keys()]);
  });

  it("never interleaves with the service logger's lines on one stderr pipe, even when the reader lags", async () => {
    // The service logger writes synchronously to stderr from the event loop while the access
    // log's writes run on libuv's threads: with writes of at most PIPE_BUF bytes, ending at a
    // line's end, a full pipe cannot splice one log's line into the other's.
    const script = `
      const { pino } = await import("pino");
      const { createAccessLog } = await import(${JSON.stringify(ACCESS_LOG)});
      const service = pino({ base: { service: "tessera" } }, pino.destination({ dest: 2, sync: true }));
      const access = createAccessLog("info");
      for (let i = 0; i < 30_000; i++) {
        access.writeLine(JSON.stringify({ msg: "access", i, pad: "a".repeat(i % 400) }) + "\\n");
        if (i % 10 === 0) service.info({ i, pad: "s".repeat(i % 900) }, "service");
        if (i % 100 === 0) await new Promise(setImmediate);
      }
      await access.close();
    `;
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    const chunks: Buffer[] = [];
    // A slow reader: the pipe fills, writes come back partial or wait.
    child.stderr.on("data", (d: Buffer) => {
      chunks.push(d);
      child.stderr.pause();
      setTimeout(() => child.stderr.resume(), 2);
    });
    // "close", not "exit": the process may exit before this slow reader has read its last lines.
    expect(await new Promise((r) => child.on("close", r))).toBe(0);
    const lines = Buffer.concat(chunks).toString("utf8").trimEnd().split("\n");
    const parsed = lines.map((l) => JSON.parse(l) as { msg: string; i: number });
    const access = parsed.filter((l) => l.msg === "access").map((l) => l.i);
    expect(access).toEqual([...Array(30_000).keys()]);
    expect(parsed.filter((l) => l.msg === "service")).toHaveLength(3_000);
  }, 60_000);
});

describe("the access line", () => {
  function captured(): { log: AccessLog; lines: string[] } {
    const lines: string[] = [];
    return {
      lines,
      log: { level: "info", isLevelEnabled: (l) => l !== "debug", writeLine: (line) => lines.push(line) },
    };
  }
  const method = UserService.method.getCurrentUser;

  it("is a pino-format JSON line with the call's facts, escaped wherever a value needs it", () => {
    const { log, lines } = captured();
    const observe = createCallObserver({ metrics: undefined, log, access: "info", prefixes })!;
    const state: RequestState = {
      requestId: "req-1",
      ip: 'we"ird\\ip\n\u00e9',
      certificate: null,
      principal: {
        kind: "machine",
        method: "mtls",
        id: 'id"with\\quotes',
        tenantId: "t",
        scopes: [],
      },
      startedAt: performance.now() - 12.5,
    } as RequestState;
    observe(state, {}, method, "grpc", 7);
    expect(lines).toHaveLength(1);
    expect(lines[0]!.endsWith("\n")).toBe(true);
    const line = JSON.parse(lines[0]!) as Record<string, unknown>;
    expect(Object.keys(line)).toEqual([
      "level",
      "time",
      "service",
      "requestId",
      "method",
      "protocol",
      "code",
      "reason",
      "durationMs",
      "principalKind",
      "principalId",
      "authMethod",
      "ip",
      "msg",
    ]);
    expect(line).toMatchObject({
      level: 30,
      service: "tessera",
      requestId: "req-1",
      method: "tessera.v1.UserService/GetCurrentUser",
      protocol: "grpc",
      code: "permission_denied",
      principalKind: "machine",
      principalId: 'id"with\\quotes',
      authMethod: "mtls",
      ip: 'we"ird\\ip\n\u00e9',
      msg: "access",
    });
    expect(typeof line.reason).toBe("string");
    expect(Math.abs((line.time as number) - Date.now())).toBeLessThan(5_000);
    expect(line.durationMs as number).toBeGreaterThanOrEqual(12);
  });

  it("reaches the log as UTF-8 whichever of its values is not ASCII, on the call that makes it and on later ones", async () => {
    const file = join(mkdtempSync(join(tmpdir(), "tessera-access-")), "access.log");
    const fd = openSync(file, "a");
    const writer = new AccessLogWriter("info", fd);
    const observe = createCallObserver({ metrics: undefined, log: writer, access: "info", prefixes })!;
    const plain = { kind: "user", method: "jwt", id: "alice", tenantId: "t", scopes: [] } as const;
    const accented = {
      kind: "user",
      method: "jwt",
      id: "ren\u00e9e-\u{1f600}",
      tenantId: "t",
      scopes: [],
    } as const;
    // Each value that is not ASCII, then calls that reuse what the one before kept (the
    // principal's fields, the address) and calls that are all ASCII between them.
    const calls = [
      { requestId: "r0", principal: plain, ip: "10.0.0.1", code: 0 },
      { requestId: "r\u00e91", principal: plain, ip: "10.0.0.1", code: 0 },
      { requestId: "r2", principal: plain, ip: "10.0.0.1", code: 0 },
      { requestId: "r3", principal: accented, ip: "10.0.0.1", code: 0 },
      { requestId: "r4", principal: accented, ip: "10.0.0.1", code: 0 },
      { requestId: "r5", principal: plain, ip: "10.0.0.1", code: 0 },
      { requestId: "r6", principal: plain, ip: "h\u00f4te", code: 0 },
      { requestId: "r7", principal: plain, ip: "h\u00f4te", code: 0 },
      { requestId: "r8", principal: null, ip: "10.0.0.1", code: 7, reason: "D\u00c9NI" },
      { requestId: "r9", principal: null, ip: "10.0.0.1", code: 0 },
      { requestId: "r10", principal: plain, ip: "10.0.0.1", code: 7, reason: "DENIED" },
    ] as const;
    try {
      for (const call of calls)
        observe(
          {
            requestId: call.requestId,
            ip: call.ip,
            certificate: null,
            principal: call.principal,
            ...("reason" in call ? { errorInfo: { reason: call.reason } } : {}),
          } as RequestState,
          {},
          method,
          "connect",
          call.code,
        );
      await writer.close();
      const got = readFileSync(file, "utf8")
        .trimEnd()
        .split("\n")
        .map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(got.map((l) => [l.requestId, l.principalId, l.ip, l.reason])).toEqual(
        calls.map((c) => [c.requestId, c.principal?.id, c.ip, "reason" in c ? c.reason : undefined]),
      );
    } finally {
      closeSync(fd);
    }
  });

  it("has no principal fields for an anonymous call, and no reason when it succeeded", () => {
    const { log, lines } = captured();
    const observe = createCallObserver({ metrics: undefined, log, access: "info", prefixes })!;
    observe(
      { requestId: "r", ip: "::1", certificate: null, principal: null, startedAt: performance.now() },
      {},
      method,
      "connect",
      0,
    );
    const line = JSON.parse(lines[0]!) as Record<string, unknown>;
    expect(line).toMatchObject({ code: "ok", ip: "::1" });
    expect(line).not.toHaveProperty("reason");
    expect(line).not.toHaveProperty("principalId");
  });

  it("names each call's own principal, address, protocol and time when they change from call to call", async () => {
    const { log, lines } = captured();
    const observe = createCallObserver({ metrics: undefined, log, access: "info", prefixes })!;
    const alice = { kind: "user", method: "jwt", id: "alice", tenantId: "t", scopes: [] } as const;
    const bob = { kind: "machine", method: "pat", id: 'b"ob', tenantId: "t", scopes: [] } as const;
    const calls = [
      { principal: alice, ip: "10.0.0.1", protocol: "connect" },
      { principal: alice, ip: "10.0.0.1", protocol: "connect" },
      { principal: bob, ip: "10.0.0.1", protocol: "grpc" },
      { principal: null, ip: "10.0.0.2", protocol: "grpc" },
      { principal: alice, ip: 'x"y', protocol: "grpc-web" },
      { principal: alice, ip: "10.0.0.1", protocol: "connect" },
    ] as const;
    const times: number[] = [];
    for (const [i, call] of calls.entries()) {
      if (i === 3) await new Promise((r) => setTimeout(r, 5));
      times.push(Date.now());
      observe(
        { requestId: `r${i}`, ip: call.ip, certificate: null, principal: call.principal },
        {},
        method,
        call.protocol,
        0,
      );
    }
    const got = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(
      got.map((l) => [l.requestId, l.principalId, l.principalKind, l.authMethod, l.ip, l.protocol]),
    ).toEqual(
      calls.map((c, i) => [
        `r${i}`,
        c.principal?.id,
        c.principal?.kind,
        c.principal?.method,
        c.ip,
        c.protocol,
      ]),
    );
    for (const [i, l] of got.entries()) {
      expect(l.time as number).toBeGreaterThanOrEqual(times[i]!);
      expect(l.time as number).toBeLessThanOrEqual(times[i]! + 50);
    }
    expect(got[3]!.time as number).toBeGreaterThan(got[2]!.time as number);
  });

  it("is written at debug only when the log's level lets debug through", () => {
    const { log, lines } = captured();
    const observe = createCallObserver({ metrics: undefined, log, access: "debug", prefixes })!;
    const state = { requestId: "r", ip: "::1", certificate: null, principal: null } as RequestState;
    observe(state, {}, method, "connect", 0);
    expect(lines).toHaveLength(0);
    log.isLevelEnabled = () => true;
    observe(state, {}, method, "connect", 0);
    expect((JSON.parse(lines[0]!) as { level: number }).level).toBe(20);
  });

  it("goes through an app's own logger: its formatters, base, mixin, bindings and multistream routing apply", () => {
    const infoSink: string[] = [];
    const errorSink: string[] = [];
    const streams = pino.multistream([
      { level: "info", stream: { write: (s: string) => void infoSink.push(s) } },
      { level: "error", stream: { write: (s: string) => void errorSink.push(s) } },
    ]);
    const logger = pino(
      {
        level: "info",
        base: { service: "svc-under-test" },
        mixin: () => ({ mixed: true }),
        formatters: { level: (label) => ({ level: label }) },
        timestamp: pino.stdTimeFunctions.isoTime,
      },
      streams,
    ).child({ component: "edge" });
    const observe = createCallObserver({
      metrics: undefined,
      log: accessLogOf(logger),
      access: "info",
      prefixes,
    })!;
    const state = {
      requestId: "req-2",
      ip: "192.0.2.7",
      certificate: null,
      principal: { kind: "user", method: "jwt", id: "u-1", tenantId: "t", scopes: [] },
      startedAt: performance.now() - 3,
    } as unknown as RequestState;
    // An error line first: a raw write into the multistream used to follow it to the error sink.
    logger.error("boom");
    observe(state, {}, method, "connect", 0);
    observe({ ...state, principal: null }, {}, method, "grpc", 16);
    expect(errorSink.map((l) => JSON.parse(l).msg)).toEqual(["boom"]);
    const access = infoSink.map((l) => JSON.parse(l)).filter((l) => l.msg === "access");
    expect(access).toHaveLength(2);
    expect(access[0]).toMatchObject({
      level: "info",
      service: "svc-under-test",
      mixed: true,
      component: "edge",
      requestId: "req-2",
      method: "tessera.v1.UserService/GetCurrentUser",
      protocol: "connect",
      code: "ok",
      principalKind: "user",
      principalId: "u-1",
      authMethod: "jwt",
      ip: "192.0.2.7",
    });
    expect(access[0].time).toMatch(/^\d{4}-\d\d-\d\dT/);
    expect(access[1]).toMatchObject({ code: "unauthenticated", protocol: "grpc" });
    expect(access[1]).not.toHaveProperty("principalId");
    // Under the logger's level: nothing.
    logger.level = "warn";
    observe(state, {}, method, "connect", 0);
    expect(infoSink.filter((l) => JSON.parse(l).msg === "access")).toHaveLength(2);
  });
});
