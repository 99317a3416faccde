import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DbProxy } from "../db-proxy.js";
import { dropSchema, startTestServer, type TestServer } from "../helpers.js";

/**
 * The doors that are no RPC answer a database outage as the RPCs do: 503 with
 * `Retry-After`, so a client or a balancer polling them is told when to come back, and
 * they recover by themselves once the database is back.
 */

const schema = `t_${Date.now().toString(36)}_readyout`;
let proxy: DbProxy;
let s: TestServer;
let agent: Agent;

const get = (path: string) => undiciFetch(`${s.server.url}${path}`, { dispatcher: agent });

beforeAll(async () => {
  proxy = await DbProxy.start();
  s = await startTestServer(
    { name: "postgres", url: () => proxy.url(schema) },
    { database: { statementTimeoutMs: 1_000 } },
  );
  agent = new Agent({ connect: { ca: s.certs.ca } });
}, 120_000);

afterAll(async () => {
  proxy?.restore();
  await agent?.close();
  await s?.close();
  await proxy?.close();
  await dropSchema(`postgres://postgres@127.0.0.1:5432/test?schema=${schema}`);
});

describe("GET /ready while PostgreSQL is away", () => {
  it("answers 503 UNAVAILABLE with Retry-After, and 200 again once it is back", async () => {
    expect((await get("/ready")).status).toBe(200);
    proxy.cut();
    const down = await get("/ready");
    expect(down.status).toBe(503);
    expect(down.headers.get("retry-after")).toBe("1");
    expect(((await down.json()) as { code: string }).code).toBe("UNAVAILABLE");
    proxy.restore();
    let up = await get("/ready");
    for (let i = 0; i < 50 && up.status !== 200; i++) {
      await new Promise((r) => setTimeout(r, 100));
      up = await get("/ready");
    }
    expect(up.status).toBe(200);
  }, 60_000);
});
