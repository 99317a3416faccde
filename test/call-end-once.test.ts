import http from "node:http";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { afterEach, describe, expect, it } from "vitest";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { type ConnectHandlerOptions, createConnectHandler } from "../src/transport/fast-adapter.js";
import { createStockDispatch, type StockDispatch } from "../src/transport/stock-adapter.js";
import { serveRequests } from "../src/transport/stream-server.js";

/**
 * Every call reaches `onCallEnd` (the metrics counter and the access line: call-observer.ts)
 * exactly once, however it ends: on the stock transport (server.transport=connect) a call
 * whose dispatch threw before connect-node's adapter listened for its end was answered
 * Internal and never counted nor logged; and on the fast transport, whatever admission decides.
 */

type Ends = { code: number }[];
/** A call that succeeded (Connect's Code has no member for it). */
const OK = 0;

let closers: (() => Promise<void>)[] = [];
afterEach(async () => {
  await Promise.all(closers.map((c) => c()));
  closers = [];
});

/** A server of Health on `options`, installed as Tessera's is; `close` ends every session (so every "close" has fired). */
async function start(
  options: Partial<ConnectHandlerOptions>,
  serveWith?: (options: ConnectHandlerOptions) => StockDispatch,
) {
  const ends: Ends = [];
  const handler = createConnectHandler(
    {
      ...options,
      onCallEnd: (_req, _method, _protocol, code) => ends.push({ code }),
      routes(router) {
        router.service(Health, {
          check(req) {
            if (req.service === "fail") throw new ConnectError("no such service", Code.NotFound);
            return { status: HealthCheckResponse_ServingStatus.SERVING };
          },
          list: () => ({ statuses: {} }),
          async *watch() {},
        });
      },
    },
    serveWith,
  );
  const server = http2.createServer();
  serveRequests(server, handler);
  const sessions = new Set<http2.Http2Session>();
  server.on("session", (s: http2.Http2Session) => sessions.add(s));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const close = () =>
    new Promise<void>((done) => {
      for (const s of sessions) s.destroy();
      server.close(() => done());
    });
  closers.push(close);
  return { url, ends, close };
}

const transports: [string, (url: string) => Transport][] = [
  ["Connect JSON", (url) => createConnectTransport({ baseUrl: url, httpVersion: "2" })],
  ["gRPC", (url) => createGrpcTransport({ baseUrl: url })],
];

/** The code a Check of `service` ends with, as the client sees it. */
async function check(transport: Transport, service = ""): Promise<number> {
  // Bounded: a call nothing answers (a server that threw it away) fails rather than hangs.
  return createClient(Health, transport)
    .check({ service }, { timeoutMs: 5000 })
    .then(
      () => OK,
      (e: unknown) => ConnectError.from(e).code,
    );
}

/** The calls reported once the server has let every stream go (a late second report would be in). */
async function settled(s: { ends: Ends; close: () => Promise<void> }): Promise<number[]> {
  await expect.poll(() => s.ends.length).toBeGreaterThan(0);
  await s.close();
  await new Promise((resolve) => setTimeout(resolve, 20));
  return s.ends.map((e) => e.code);
}

describe("the end of a call on the stock transport", () => {
  for (const [name, transport] of transports) {
    it(`reports a call whose dispatch throws at once, exactly once, as Internal (${name})`, async () => {
      const s = await start({}, () => () => {
        throw new Error("a bug in the dispatch");
      });
      expect(await check(transport(s.url))).toBe(Code.Internal);
      expect(await settled(s)).toEqual([Code.Internal]);
    });

    it(`reports a call that throws inside connect-node's adapter (its listener registered) exactly once (${name})`, async () => {
      // connect-node's adapter calls contextValues in the request listener, after the
      // dispatch listens for the call's end.
      const s = await start(
        {
          contextValues: () => {
            throw new Error("a bug in contextValues");
          },
        },
        createStockDispatch,
      );
      expect(await check(transport(s.url))).toBe(Code.Internal);
      expect(await settled(s)).toEqual([Code.Internal]);
    });

    it(`reports a call served, and one failed by its handler, exactly once each (${name})`, async () => {
      const s = await start({}, createStockDispatch);
      expect(await check(transport(s.url))).toBe(OK);
      expect(await check(transport(s.url), "fail")).toBe(Code.NotFound);
      await expect.poll(() => s.ends.length).toBe(2);
      expect((await settled(s)).sort()).toEqual([OK, Code.NotFound].sort());
    });
  }
});

describe("the end of a call admitted on the fast transport", () => {
  const refused = () => new ConnectError("refused", Code.PermissionDenied);
  const verdicts: [string, NonNullable<ConnectHandlerOptions["admit"]>, number][] = [
    ["refused at once", () => refused(), Code.PermissionDenied],
    ["refused later", () => Promise.resolve(refused()), Code.PermissionDenied],
    [
      "admit throwing",
      () => {
        throw new Error("a bug in admit");
      },
      Code.Internal,
    ],
    ["admit rejecting", () => Promise.reject(new Error("a bug in admit")), Code.Internal],
    ["admitted at once", () => undefined, OK],
    ["admitted later", () => Promise.resolve(undefined), OK],
  ];
  for (const [name, transport] of transports)
    for (const [what, admit] of [
      ["without admission", undefined],
      ["admitted at once", () => undefined],
      ["admitted later", () => Promise.resolve(undefined)],
    ] as const)
      it(`answers Internal and reports once a call whose serving throws, ${what} (${name})`, async () => {
        // Thrown out of Node's request listener or admission's promise, it ended the process.
        const s = await start({
          ...(admit ? { admit } : {}),
          contextValues: () => {
            throw new Error("a bug in contextValues");
          },
        });
        expect(await check(transport(s.url))).toBe(Code.Internal);
        expect(await settled(s)).toEqual([Code.Internal]);
      });

  for (const [name, transport] of transports)
    for (const [what, admit, code] of verdicts)
      it(`reports a call ${what} exactly once (${name})`, async () => {
        const s = await start({ admit });
        expect(await check(transport(s.url))).toBe(code);
        expect(await settled(s)).toEqual([code]);
      });
});

describe("a throw while serving an admitted call with a body still coming (fast transport)", () => {
  it("drops the rest of the body, so the next request on the same HTTP/1.1 connection is answered", async () => {
    let calls = 0;
    const ends: number[] = [];
    const handler = createConnectHandler({
      onCallEnd: (_req, _method, _protocol, code) => ends.push(code),
      contextValues: () => {
        if (calls++ === 0) throw new Error("a bug in contextValues");
        return undefined as never;
      },
      routes(router) {
        router.service(Health, {
          check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }),
          list: () => ({ statuses: {} }),
          async *watch() {},
        });
      },
    });
    // HTTP/1.1 requests reach the handler as Node's request listener, as on Tessera's port.
    const server = http.createServer(handler as unknown as http.RequestListener);
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    closers.push(
      () =>
        new Promise<void>((done) => {
          agent.destroy();
          server.closeAllConnections();
          server.close(() => done());
        }),
    );
    const port = (server.address() as AddressInfo).port;
    const call = (body: string) =>
      new Promise<number | string>((resolve) => {
        const req = http.request(
          {
            host: "127.0.0.1",
            port,
            method: "POST",
            path: "/grpc.health.v1.Health/Check",
            agent,
            headers: { "content-type": "application/json" },
            timeout: 5000,
          },
          (res) => {
            res.resume();
            res.on("end", () => resolve(res.statusCode ?? 0));
          },
        );
        req.on("timeout", () => req.destroy(new Error("no answer")));
        req.on("error", (e) => resolve(e.message));
        req.end(body);
      });
    // 2 MB: more than the body reader takes before it pauses.
    expect(await call(`{${" ".repeat(2_000_000)}}`)).toBe(500);
    // Before: the paused body was never drained and this request, queued behind it, hung.
    expect(await call("{}")).toBe(200);
    expect(ends).toEqual([Code.Internal, OK]);
  });
});
