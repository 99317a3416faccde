import { mkdtempSync, readFileSync } from "node:fs";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, describe, expect, it } from "vitest";
import { ADMIN_PASSWORD } from "../helpers.js";
import { killAll, serve } from "./processes.js";

afterAll(killAll);

const LOGIN = JSON.stringify({ username: "admin", password: ADMIN_PASSWORD });

/** One request on `session`: its status and body, or the error that ended it. */
function request(
  session: http2.ClientHttp2Session,
  method: string,
  path: string,
  body?: string,
): Promise<{ status?: number; body: string; error?: string }> {
  return new Promise((resolve) => {
    const stream = session.request({
      ":method": method,
      ":path": path,
      ...(body ? { "content-type": "application/json" } : {}),
    });
    let status: number | undefined;
    let text = "";
    stream.on("response", (h) => (status = h[":status"] as number));
    stream.setEncoding("utf8");
    stream.on("data", (d) => (text += d));
    stream.on("end", () => resolve({ ...(status !== undefined ? { status } : {}), body: text }));
    stream.on("error", (err) => resolve({ body: text, error: err.message }));
    stream.end(body);
  });
}

/** A new HTTP/2 connection: resolves once connected, or with the connection's error. */
function connect(url: string, ca: Buffer): Promise<http2.ClientHttp2Session | Error> {
  return new Promise((resolve) => {
    const session = http2.connect(url, { ca, servername: "localhost" });
    session.once("connect", () => resolve(session));
    session.once("error", (err) => resolve(err));
  });
}

describe("draining a `tessera serve` on SIGTERM", () => {
  it("answers /ready 503 at once, serves calls and new connections for the drain delay, then refuses connections, finishes the call in flight and exits 0", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-drain-"));
    // Long enough that what must happen within it (a /ready poll, two logins, a new TLS
    // connection, each a process hop away) fits on a loaded machine, where a plain call can
    // take seconds.
    const DELAY_S = 10;
    const { url, child } = await serve({
      ...(process.env as Record<string, string>),
      TESSERA_DATABASE_URL: `sqlite:${join(dir, "tessera.db")}`,
      TESSERA_CERT_DIR: join(dir, "certs"),
      TESSERA_HOST: "127.0.0.1",
      TESSERA_PORT: "0",
      TESSERA_ADMIN_PASSWORD: ADMIN_PASSWORD,
      TESSERA_PASSWORD_ITERATIONS: "1000",
      TESSERA_RATE_LIMIT: "false",
      TESSERA_DRAIN_DELAY_SECONDS: String(DELAY_S),
      TESSERA_SHUTDOWN_GRACE_SECONDS: "10",
      // The call in flight sends the rest of its body only after the delay, on purpose.
      TESSERA_REQUEST_TIMEOUT_SECONDS: "60",
    });
    const ca = readFileSync(join(dir, "certs", "ca.crt"));
    const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
    const open = (await connect(url, ca)) as http2.ClientHttp2Session;
    open.on("error", () => undefined);
    expect((await request(open, "GET", "/ready")).status).toBe(200);

    // A Login in flight: headers and part of its body sent before the signal.
    const inFlight = open.request({
      ":method": "POST",
      ":path": "/tessera.v1.UserService/Login",
      "content-type": "application/json",
    });
    inFlight.write(LOGIN.slice(0, 10));
    const inFlightStatus = new Promise<number | undefined>((resolve) => {
      let status: number | undefined;
      inFlight.on("response", (h) => (status = h[":status"] as number));
      inFlight.resume();
      inFlight.on("close", () => resolve(status));
    });
    await sleep(200);

    const signalled = performance.now();
    child.kill("SIGTERM");
    // /ready turns 503 at once, on a connection already open: well within the first half of
    // the delay (not at its end, when the port closes).
    const READY_BOUND_MS = (DELAY_S * 1000) / 2;
    let ready = await request(open, "GET", "/ready");
    while (ready.status === 200 && performance.now() - signalled < READY_BOUND_MS) {
      await sleep(20);
      ready = await request(open, "GET", "/ready");
    }
    const readyFailedAfter = performance.now() - signalled;
    expect(ready.status).toBe(503);
    expect(JSON.parse(ready.body)).toMatchObject({ code: "UNAVAILABLE", message: "draining: shutting down" });
    expect(readyFailedAfter).toBeLessThan(READY_BOUND_MS);
    // The rest is served as before: calls on the open connection, and new connections.
    expect((await request(open, "POST", "/tessera.v1.UserService/Login", LOGIN)).status).toBe(200);
    const fresh = await connect(url, ca);
    expect(fresh).not.toBeInstanceOf(Error);
    const freshSession = fresh as http2.ClientHttp2Session;
    freshSession.on("error", () => undefined);
    expect((await request(freshSession, "POST", "/tessera.v1.UserService/Login", LOGIN)).status).toBe(200);
    expect((await request(freshSession, "GET", "/ready")).status).toBe(503);
    const servedNewUntil = performance.now() - signalled;
    freshSession.close();
    // Still within the delay when all of that was answered (else the test proves nothing).
    expect(servedNewUntil).toBeLessThan(DELAY_S * 1000);

    // After the delay the port closes: new connections are refused.
    let refusedAfter = Number.NaN;
    while (performance.now() - signalled < (DELAY_S + 8) * 1000) {
      const attempt = await connect(url, ca);
      if (attempt instanceof Error) {
        refusedAfter = performance.now() - signalled;
        expect((attempt as NodeJS.ErrnoException).code).toBe("ECONNREFUSED");
        break;
      }
      attempt.destroy();
      await sleep(100);
    }
    // Not before the delay (a little slack for timer granularity), and not long after it.
    expect(refusedAfter).toBeGreaterThanOrEqual(DELAY_S * 1000 - 100);
    expect(refusedAfter).toBeLessThan((DELAY_S + 8) * 1000);

    // The call in flight since before the signal completes within the grace period.
    inFlight.end(LOGIN.slice(10));
    expect(await inFlightStatus).toBe(200);
    open.close();
    expect(await exited).toBe(0);
    console.log(
      `drain: /ready 503 after ${readyFailedAfter.toFixed(0)} ms; new connection served at ${servedNewUntil.toFixed(0)} ms; ` +
        `refused from ${refusedAfter.toFixed(0)} ms (delay ${DELAY_S} s)`,
    );
  }, 90_000);
});
