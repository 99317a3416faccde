import { EventEmitter } from "node:events";
import http2 from "node:http2";
import { getHeapSpaceStatistics, setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { describe, expect, it } from "vitest";
import type { Config } from "../src/config.js";
import { boundConnections } from "../src/server/connection-limits.js";

// The idle checks keep each session's open streams. Kept in a Set, once the Set's table was in
// V8's old generation (a long session, or a full collection under load), every rehash left an
// old table holding the streams it held, and those dead tables kept closed streams, and all
// their call referenced, alive through every scavenge until the next full collection
// (bench/results/2026-12-09-pret2.md). Streams here carry 8 KB each, so what survives shows in
// the old generation.
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as (options?: { type: "minor" | "major" }) => void;
const oldSpaceUsed = () =>
  getHeapSpaceStatistics().find((s) => s.space_name === "old_space")!.space_used_size;

describe("the open streams of a session", () => {
  it("keep no closed stream alive through scavenges once their bookkeeping is old", () => {
    const server = http2.createServer();
    const cfg = {
      maxConnections: 0,
      maxConnectionsPerIp: 0,
      idleTimeoutSeconds: 60,
      requestTimeoutSeconds: 0,
      maxStreamSeconds: 0,
    } as Config["server"];
    boundConnections(server, cfg, false);
    const session = Object.assign(new EventEmitter(), { setTimeout() {}, socket: undefined });
    server.emit("session", session);
    const open: EventEmitter[] = [];
    const churn = (n: number) => {
      for (let i = 0; i < n; i++) {
        const stream = Object.assign(new EventEmitter(), {
          session,
          state: { remoteClose: 1 },
          closed: false,
          destroyed: false,
          bufferSize: 0,
          close() {},
          payload: new Array(1000).fill(i),
        });
        server.emit("stream", stream);
        open.push(stream);
        // 20 streams open at a time, as a busy connection has.
        if (open.length > 20) open.shift()!.emit("close");
      }
    };
    churn(200);
    // A full collection moves the session's bookkeeping to the old generation.
    gc();
    const before = oldSpaceUsed();
    churn(3000);
    for (const stream of open.splice(0)) stream.emit("close");
    gc({ type: "minor" });
    gc({ type: "minor" });
    // 3000 closed streams of 8 KB: a Set kept ~10-20 MB of them; the list keeps none.
    expect(oldSpaceUsed() - before).toBeLessThan(4 * 1024 * 1024);
    server.close();
  });
});
