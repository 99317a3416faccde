import http2 from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";

/**
 * A peer that asks for answers and takes none of them (a zero flow-control window) has them
 * cancelled after an idle period. The check ran only when the connection was idle, and a
 * PING every few hundred milliseconds keeps it from ever being idle: the streams (public,
 * unbudgeted GETs here) were held until server.maxStreamSeconds, an hour by default.
 */
describe("answers a client never takes, on a connection it keeps busy with PINGs", () => {
  let ts: TestServer;
  let openOnServer = 0;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE, { server: { idleTimeoutSeconds: 1, requestTimeoutSeconds: 1 } });
    ts.server.server.on("stream", (stream: http2.ServerHttp2Stream) => {
      openOnServer++;
      stream.on("close", () => openOnServer--);
    });
  });
  afterAll(async () => ts?.close());

  it("are cancelled after an idle period all the same", async () => {
    const session = http2.connect(ts.server.url, { ca: ts.certs.ca, settings: { initialWindowSize: 0 } });
    session.on("error", () => undefined);
    await new Promise((resolve) => session.once("connect", resolve));
    const pings = setInterval(() => session.ping(() => undefined), 200);
    const codes: (number | undefined)[] = [];
    try {
      for (let i = 0; i < 100; i++) {
        const stream = session.request({ ":method": "GET", ":path": "/.well-known/jwks.json" });
        stream.on("error", () => undefined);
        stream.on("close", () => codes.push(stream.rstCode));
      }
      await expect.poll(() => openOnServer, { timeout: 3_000 }).toBeGreaterThanOrEqual(100);
      // Two idle periods (the answer waited a whole one without shrinking), and a margin.
      await expect.poll(() => openOnServer, { timeout: 4_500 }).toBe(0);
      await expect.poll(() => codes.length).toBe(100);
      expect(codes.every((c) => c === http2.constants.NGHTTP2_CANCEL)).toBe(true);
    } finally {
      clearInterval(pings);
      session.destroy();
    }
  });
});
