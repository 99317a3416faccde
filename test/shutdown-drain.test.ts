import http2 from "node:http2";
import https from "node:https";
import { describe, expect, it } from "vitest";
import { ADMIN_PASSWORD, SQLITE, startTestServer, type TestServer } from "./helpers.js";

const LOGIN_BODY = JSON.stringify({ username: "admin", password: ADMIN_PASSWORD });

/** A Login over HTTP/2 that has sent its headers and part of its body; `finish` sends the rest. */
function openLogin(session: http2.ClientHttp2Session) {
  const stream = session.request({
    ":method": "POST",
    ":path": "/tessera.v1.UserService/Login",
    "content-type": "application/json",
  });
  stream.write(LOGIN_BODY.slice(0, 10));
  const answer = new Promise<{ status?: number }>((resolve) => {
    let status: number | undefined;
    stream.on("response", (h) => (status = h[":status"] as number));
    stream.resume();
    const settle = () => resolve(status === undefined ? {} : { status });
    stream.on("end", settle);
    stream.on("error", settle);
    stream.on("close", settle);
  });
  return { finish: () => stream.end(LOGIN_BODY.slice(10)), answer };
}

/** The graceful close of a running server (what SIGTERM runs), driven in process. */
describe("closing a server", () => {
  const withServer = async (fn: (ts: TestServer) => Promise<void>) => {
    const ts = await startTestServer(SQLITE);
    try {
      await fn(ts);
    } finally {
      await ts.app.close();
    }
  };

  it("waits for a call in flight, and no longer than it takes", async () => {
    await withServer(async (ts) => {
      const session = http2.connect(ts.server.url, { ca: ts.certs.ca, servername: "localhost" });
      session.on("error", () => undefined);
      const call = openLogin(session);
      await new Promise((r) => setTimeout(r, 200));
      const started = performance.now();
      const closing = ts.server.close(20_000);
      await new Promise((r) => setTimeout(r, 300));
      call.finish();
      expect((await call.answer).status).toBe(200);
      expect(await closing).toEqual({ cut: 0 });
      // Not the 20 s grace period: closed once the call was answered.
      expect(performance.now() - started).toBeLessThan(5_000);
      session.destroy();
    });
  });

  it("cuts a call still open when the grace period ends", async () => {
    await withServer(async (ts) => {
      const session = http2.connect(ts.server.url, { ca: ts.certs.ca, servername: "localhost" });
      session.on("error", () => undefined);
      const call = openLogin(session);
      await new Promise((r) => setTimeout(r, 200));
      const started = performance.now();
      expect(await ts.server.close(1_000)).toEqual({ cut: 1 });
      const took = performance.now() - started;
      expect(took).toBeGreaterThanOrEqual(950);
      expect(took).toBeLessThan(5_000);
      // Never answered: its connection was cut.
      expect((await call.answer).status).toBeUndefined();
      session.destroy();
    });
  });

  it("is not held open by an idle HTTP/1.1 keep-alive connection", async () => {
    await withServer(async (ts) => {
      const agent = new https.Agent({ keepAlive: true, ca: ts.certs.ca });
      const status = await new Promise<number | undefined>((resolve, reject) => {
        const req = https.get(`${ts.server.url}/health`, { agent, servername: "localhost" }, (res) => {
          res.resume();
          res.on("end", () => resolve(res.statusCode));
        });
        req.on("error", reject);
      });
      expect(status).toBe(200);
      const started = performance.now();
      expect(await ts.server.close(20_000)).toEqual({ cut: 0 });
      expect(performance.now() - started).toBeLessThan(5_000);
      agent.destroy();
    });
  });
});
