import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Config } from "../src/config.js";
import { boundConnections } from "../src/server/connection-limits.js";

// The request and stream-life bounds of boundConnections alone, on h2c: each stream is
// cancelled at its own bound (a complete request at the stream bound, not the request one),
// and a stream that ends first does not move the others' deadlines.
describe("stream deadlines", () => {
  const server = http2.createServer();
  let client: http2.ClientHttp2Session;

  beforeAll(async () => {
    const cfg = {
      maxConnections: 0,
      maxConnectionsPerIp: 0,
      idleTimeoutSeconds: 0,
      requestTimeoutSeconds: 1,
      maxStreamSeconds: 1,
    } as Config["server"];
    boundConnections(server, cfg, false);
    // "/answer" is answered at once; every other stream is never answered.
    server.on("stream", (stream, headers) => {
      stream.on("error", () => undefined);
      if (headers[":path"] === "/answer") {
        stream.respond({ ":status": 200 });
        stream.end();
      }
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    client = http2.connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    client.on("error", () => undefined);
  });
  afterAll(async () => {
    client.destroy();
    await new Promise((resolve) => server.close(resolve));
  });

  /** Opens a stream; resolves with its reset code and when it closed, in ms from `t0`. */
  const open = (path: string, endRequest: boolean, t0: number) => {
    const stream = client.request({ ":method": "POST", ":path": path }, { endStream: false });
    stream.on("error", () => undefined);
    stream.resume();
    if (endRequest) stream.end("x");
    else stream.write("x");
    return new Promise<{ code: number | undefined; at: number }>((resolve) =>
      stream.once("close", () => resolve({ code: stream.rstCode, at: performance.now() - t0 })),
    );
  };
  const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  it("cancels a stalled request at the request bound and a complete one at the stream bound", async () => {
    const t0 = performance.now();
    const answered = open("/answer", true, t0);
    const stalled = open("/stalled", false, t0);
    const complete = open("/complete", true, t0);
    await pause(300);
    const later = open("/later", false, t0);
    expect((await answered).at).toBeLessThan(900);
    const CANCEL = http2.constants.NGHTTP2_CANCEL;
    const s = await stalled;
    expect(s.code).toBe(CANCEL);
    expect(s.at).toBeGreaterThanOrEqual(990);
    expect(s.at).toBeLessThan(1900);
    const l = await later;
    expect(l.code).toBe(CANCEL);
    // Its own deadline, one request bound after it began, not the earlier stream's.
    expect(l.at).toBeGreaterThanOrEqual(1290);
    expect(l.at).toBeLessThan(2200);
    const c = await complete;
    expect(c.code).toBe(CANCEL);
    // maxStreamSeconds plus the one second of grace, not the request bound.
    expect(c.at).toBeGreaterThanOrEqual(1990);
    expect(c.at).toBeLessThan(3500);
  });
});
