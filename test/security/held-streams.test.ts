import type http2 from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";

/**
 * Requests answered without their body (a made-up path, an OAuth request refused by the
 * per-IP budget) must not keep their HTTP/2 stream: left open until
 * server.requestTimeoutSeconds, every one held a stream slot and its memory, with no budget
 * spent, so one address with many connections held maxConcurrentStreams on each.
 */
const STREAMS = 100;
/** rateLimit.perIpPerMinute */
const BUDGET = 10;

/** Open `STREAMS` streams with `headers` whose body never ends; resolve with what became of them after `waitMs`. */
async function holdOpen(
  ts: TestServer,
  headers: http2.OutgoingHttpHeaders,
  waitMs: number,
): Promise<{ answered: number[]; open: number; serverOpen: number }> {
  const session = ts.session();
  session.on("error", () => undefined);
  await new Promise((resolve) => session.once("connect", resolve));
  const streams: http2.ClientHttp2Stream[] = [];
  const answered: number[] = [];
  for (let i = 0; i < STREAMS; i++) {
    const stream = session.request({ ...headers }, { endStream: false });
    stream.on("error", () => undefined);
    stream.on("response", (h) => answered.push(Number(h[":status"])));
    stream.resume();
    streams.push(stream);
  }
  await new Promise((resolve) => setTimeout(resolve, waitMs));
  const open = streams.filter((s) => !s.closed && !s.destroyed).length;
  const serverOpen = openOnServer;
  session.destroy();
  return { answered, open, serverOpen };
}

let openOnServer = 0;

describe.each(DATABASES)("streams answered before their body ($name)", (db) => {
  let ts: TestServer;
  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { enabled: true, perIpPerMinute: BUDGET },
      // Far past the test: only an answer that ends the stream frees it in time.
      server: { requestTimeoutSeconds: 120, idleTimeoutSeconds: 120 },
    });
    ts.server.server.on("stream", (stream: http2.ServerHttp2Stream) => {
      openOnServer++;
      stream.on("close", () => openOnServer--);
    });
  });
  afterAll(async () => ts?.close());

  // [what, request, status of the refused ones, streams rightly still open (those within the
  // per-IP budget wait for their form)]
  const cases: [string, http2.OutgoingHttpHeaders, number, number][] = [
    [
      "a POST to a path no RPC serves",
      { ":method": "POST", ":path": "/nope.v1.Nope/Nope", "content-type": "application/json" },
      404,
      0,
    ],
    ["a GET of a path nothing serves", { ":method": "GET", ":path": "/nothing-here" }, 404, 0],
    [
      "an OAuth token request past the per-IP budget",
      { ":method": "POST", ":path": "/oauth2/token", "content-type": "application/x-www-form-urlencoded" },
      429,
      BUDGET,
    ],
  ];
  it.each(cases)(
    "resets the stream of %s once answered, so none is held",
    async (_name, headers, status, waiting) => {
      const { answered, open, serverOpen } = await holdOpen(ts, headers, 1500);
      expect(answered.filter((s) => s === status).length).toBe(STREAMS - waiting);
      expect(open).toBe(waiting);
      expect(serverOpen).toBe(waiting);
    },
  );
});
