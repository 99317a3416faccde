import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { Config } from "../src/config.js";
import { boundConnections } from "../src/server/connection-limits.js";
import { ADMIN_PASSWORD, SQLITE, startTestServer, withHeaders } from "./helpers.js";

// A stream's "close" listeners past the first are kept by events.js in an array made from one
// literal site that every emitter shares; V8 may pretenure that site at start-up, and then a
// per-stream closure in such an array, or a third listener growing it, kept each call's objects
// alive through scavenges (bench/results/2026-12-08-json-cut.md, "Which site"). So the bounds
// add one listener, the same function for every stream, and tell the server's own count of
// calls in flight through it rather than through a listener of its own.
describe("the bounds' close listener", () => {
  const server = http2.createServer();
  let client: http2.ClientHttp2Session;
  let closed = 0;
  const listeners: unknown[][] = [];

  beforeAll(async () => {
    const cfg = {
      maxConnections: 0,
      maxConnectionsPerIp: 0,
      idleTimeoutSeconds: 0,
      requestTimeoutSeconds: 5,
      maxStreamSeconds: 0,
    } as Config["server"];
    boundConnections(server, cfg, false, undefined, () => closed++);
    server.on("stream", (stream) => {
      listeners.push(stream.listeners("close"));
      stream.respond({ ":status": 200 });
      stream.end();
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    client = http2.connect(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    client.on("error", () => undefined);
  });
  afterAll(async () => {
    client.destroy();
    await new Promise((resolve) => server.close(resolve));
  });

  const call = () =>
    new Promise<void>((resolve) => {
      const stream = client.request({ ":path": "/" });
      stream.resume();
      stream.on("close", resolve);
    });

  it("is one function shared by every stream, which tells the server each stream's close", async () => {
    await call();
    await call();
    await new Promise((resolve) => setImmediate(resolve));
    expect(listeners).toHaveLength(2);
    // Node's compatibility layer adds its own two (shared) functions on this server.
    expect(listeners[0].length).toBeGreaterThan(0);
    for (const [i, f] of listeners[1].entries()) expect(f).toBe(listeners[0][i]);
    expect(closed).toBe(2);
  });
});

// The same on the real server, for every call path: no per-call function among a stream's
// "close" listeners, and no more of them than events.js keeps in its two-element pair.
describe("a served call's stream", () => {
  it("closes through at most two listeners, none of them made for that call", async () => {
    const ts = await startTestServer(SQLITE);
    try {
      const seen: Array<{ path: string; listeners: unknown[] }> = [];
      ts.server.server.on("stream", (stream, headers) => {
        // Read once the call has run (its body and answer added what they add), at its close.
        stream.prependListener("close", function capture() {
          const listeners = stream.listeners("close").filter((f) => f !== capture);
          seen.push({ path: String(headers[":path"]), listeners });
        });
      });
      const login = { username: "admin", password: ADMIN_PASSWORD };
      const token = (await createClient(UserService, ts.connect()).login(login)).accessToken;
      const auth = { authorization: `Bearer ${token}` };
      for (const transport of [ts.connect(), ts.grpc(), ts.grpcWeb()]) {
        const users = createClient(UserService, withHeaders(transport, auth));
        await users.getCurrentUser({});
        await users.getCurrentUser({});
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
      const calls = seen.filter((s) => s.path.endsWith("/GetCurrentUser"));
      expect(calls).toHaveLength(6);
      for (const { listeners } of calls) expect(listeners.length).toBeLessThanOrEqual(2);
      // Every call's the same functions (in either order), so none of them is a closure per call.
      const shared = new Set(calls[0].listeners);
      for (const { listeners } of calls) for (const f of listeners) expect(shared.has(f)).toBe(true);
    } finally {
      await ts.close();
    }
  });
});
