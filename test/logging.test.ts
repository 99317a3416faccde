import http2 from "node:http2";
import { Writable } from "node:stream";
import { createClient } from "@connectrpc/connect";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createApp } from "../src/app.js";
import { startServer } from "../src/server.js";
import { rejection } from "./errors-util.js";
import {
  ADMIN_PASSWORD,
  createTestCerts,
  memoryTransport,
  SQLITE,
  testConfig,
  withHeaders,
} from "./helpers.js";

describe("logs", () => {
  it("never contain passwords or tokens, even at trace level and on failures", async () => {
    let output = "";
    const sink = new Writable({
      write(chunk, _enc, cb) {
        output += chunk.toString();
        cb();
      },
    });
    const logger = pino({ level: "trace" }, sink);
    const app = await createApp(testConfig(SQLITE.url()), { logger });
    try {
      const t = memoryTransport(app);
      const anon = createClient(UserService, t);
      const wrong = "wrong-password-that-must-not-leak";
      await rejection(anon.login({ username: "admin", password: wrong }));
      const login = await anon.login({ username: "admin", password: ADMIN_PASSWORD });
      await createClient(
        UserService,
        withHeaders(t, { authorization: `Bearer ${login.accessToken}` }),
      ).createUser({
        username: "logged-user",
        password: "another secret password",
      });
      await rejection(
        createClient(
          UserService,
          withHeaders(t, { authorization: `Bearer ${login.accessToken}x` }),
        ).getCurrentUser({}),
      );
      await rejection(anon.refreshToken({ refreshToken: `${login.refreshToken}x` }));
      await app.audit.flush();
      expect(output.length).toBeGreaterThan(0);
      for (const secret of [
        wrong,
        ADMIN_PASSWORD,
        "another secret password",
        login.accessToken,
        login.refreshToken,
      ]) {
        expect(output).not.toContain(secret);
      }
    } finally {
      await app.close();
    }
  });
});

describe("plaintext mode", () => {
  it("serves h2c only when explicitly asked to", async () => {
    const certs = await createTestCerts();
    const app = await createApp(
      testConfig(SQLITE.url(), { server: { insecurePlaintext: true, certDir: certs.dir } }),
      { logger: pino({ level: "silent" }) },
    );
    const server = await startServer(app);
    try {
      expect(server.url.startsWith("http://")).toBe(true);
      const { createGrpcTransport } = await import("@connectrpc/connect-node");
      const res = await createClient(UserService, createGrpcTransport({ baseUrl: server.url })).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      });
      expect(res.accessToken).toBeTruthy();
    } finally {
      await server.close(0);
      await app.close();
    }
  });

  it("answers over h2c with the security headers but no Strict-Transport-Security, on RPCs and plain endpoints", async () => {
    const certs = await createTestCerts();
    const app = await createApp(
      testConfig(SQLITE.url(), { server: { insecurePlaintext: true, certDir: certs.dir } }),
      { logger: pino({ level: "silent" }) },
    );
    const server = await startServer(app);
    const session = http2.connect(server.url);
    /** One request's response headers (the body read and dropped). */
    const ask = (headers: http2.OutgoingHttpHeaders, body?: string) =>
      new Promise<http2.IncomingHttpHeaders>((resolve, reject) => {
        const stream = session.request(headers);
        let answer: http2.IncomingHttpHeaders = {};
        stream.on("response", (h) => (answer = h));
        stream.on("data", () => undefined);
        stream.on("error", reject);
        stream.on("end", () => resolve(answer));
        stream.end(body);
      });
    try {
      const answers = [
        // A unary call answered on its stream, and one refused before its body is read.
        await ask(
          { ":method": "POST", ":path": "/tessera.v1.UserService/Login", "content-type": "application/json" },
          JSON.stringify({ username: "admin", password: ADMIN_PASSWORD }),
        ),
        await ask(
          {
            ":method": "POST",
            ":path": "/tessera.v1.UserService/GetCurrentUser",
            "content-type": "application/json",
          },
          "{}",
        ),
        // A plain endpoint, answered through the compatibility layer's response.
        await ask({ ":method": "GET", ":path": "/health" }),
      ];
      expect(answers.map((a) => a[":status"])).toEqual([200, 401, 200]);
      for (const answer of answers) {
        expect(answer["x-request-id"]).toMatch(/^[0-9a-f-]{36}$/);
        expect(answer["x-content-type-options"]).toBe("nosniff");
        expect(answer["x-frame-options"]).toBe("DENY");
        expect(answer["x-xss-protection"]).toBe("1; mode=block");
        expect(answer["content-security-policy"]).toBe("default-src 'self'");
        expect(answer).not.toHaveProperty("strict-transport-security");
      }
    } finally {
      session.close();
      await server.close(0);
      await app.close();
    }
  });
});

describe("the access log", () => {
  it("never holds a call up when stderr is not read: lines wait in memory, then are dropped, counted and reported once", async () => {
    const { spawn } = await import("node:child_process");
    const { fileURLToPath } = await import("node:url");
    const accessLog = fileURLToPath(new URL("../src/access-log.ts", import.meta.url));
    // 100k lines of 234 bytes (23 MB) into a stderr pipe nobody reads: a synchronous write
    // would block on the first full pipe buffer (64 KiB) and never print the result.
    const script = `
      const { createAccessLog, accessLogStats, ACCESS_LOG_BUFFER_BYTES } = await import(${JSON.stringify(accessLog)});
      let reported = 0;
      const log = createAccessLog("info", () => reported++);
      const started = performance.now();
      for (let i = 0; i < 100_000; i++) log.writeLine(JSON.stringify({ requestId: String(i).padStart(200, "x"), method: "m" }) + "\\n");
      const ms = performance.now() - started;
      process.stdout.write(JSON.stringify({ dropped: accessLogStats.dropped, reported, ms, cap: ACCESS_LOG_BUFFER_BYTES }) + "\\n");
    `;
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stderr.pause();
    const line = await new Promise<string>((resolve, reject) => {
      let out = "";
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString();
        if (out.includes("\n")) resolve(out);
      });
      child.on("exit", (code) => reject(new Error(`exited ${code} before answering: ${out}`)));
    });
    // Now read stderr, so the child can flush what it kept and exit.
    child.stderr.resume();
    await new Promise((resolve) => child.on("exit", resolve));
    const result = JSON.parse(line) as { dropped: number; reported: number; ms: number; cap: number };
    expect(result.dropped).toBeGreaterThan(0);
    // 100k lines of 234 bytes (23 MB) written, at most the buffer (16 MiB) and a pipe's worth
    // kept: the rest was dropped.
    const lineBytes = JSON.stringify({ requestId: "x".repeat(200), method: "m" }).length + 1;
    expect(result.dropped).toBeGreaterThan(100_000 - Math.ceil((result.cap + 1024 * 1024) / lineBytes));
    expect(result.reported).toBe(1);
  });
});
