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
});
