import { randomBytes } from "node:crypto";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

/** Bytes held on V8's heap and outside it (node:http2 makes long header values external strings). */
function heapAndExternal(): number {
  const m = process.memoryUsage();
  return m.heapUsed + m.external;
}

/**
 * The parse of a Bearer header is remembered by the header's value (auth/credentials.ts),
 * before the token is verified: 1024 made-up headers of 30 KB each (under
 * server.maxHeaderListSize) stayed in memory, 30 MB an anonymous caller pinned for nothing.
 */
describe("remembered Authorization headers", () => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
  });
  afterAll(async () => ts?.close());

  it("do not keep made-up bearer tokens of tens of kilobytes", async () => {
    const session = ts.session();
    session.on("error", () => undefined);
    const call = (authorization: string) =>
      new Promise<number>((resolve) => {
        const stream = session.request({
          ":method": "POST",
          ":path": "/tessera.v1.UserService/GetCurrentUser",
          "content-type": "application/json",
          authorization,
        });
        stream.on("error", () => resolve(0));
        stream.on("response", (h) => resolve(Number(h[":status"])));
        stream.resume();
        stream.end("{}");
      });
    // Warm up, then measure what 960 distinct 30 KB tokens (the memo is emptied at 1024) leave behind.
    await call(`Bearer ${"w".repeat(100)}`);
    gc();
    const before = heapAndExternal();
    const statuses: number[] = [];
    for (let i = 0; i < 960; i += 64)
      statuses.push(
        ...(await Promise.all(
          Array.from({ length: 64 }, () => call(`Bearer ${randomBytes(15_000).toString("hex")}`)),
        )),
      );
    expect(statuses.every((s) => s === 401)).toBe(true);
    gc();
    const kept = heapAndExternal() - before;
    session.destroy();
    expect(kept).toBeLessThan(8 * 1024 * 1024);
  });
});
