/**
 * Reproduces connect-node 2.1.2's uncaught "received GOAWAY without any open streams" with a
 * raw node:http2 server (h2c) and connect-node's own Http2SessionManager, no Tessera code.
 *
 *   npx tsx bench/goaway-idle-repro.ts [idle|busy|guarded] [rounds]
 *
 * idle: the server sends GOAWAY (NO_ERROR, last stream 2^31-1) on a session with no open
 *   stream; the client issues its next request as the "goaway" event is emitted. connect-node's
 *   onGoaway sees streamCount 0 and destroys the session with an error, which Node emits only
 *   after the socket has closed; meanwhile request() finds the session destroyed and leaves the
 *   state ("ready", not shutting down: onGoaway returned before setting receivedGoAway), and
 *   onExitState's cleanup() takes the "error" listener off. The error is then emitted with no
 *   listener: uncaughtException.
 * busy: the same GOAWAY, sent while a request is open (the server's answer still pending): the
 *   state is shutting down, its listeners are kept until the session closes, nothing is lost.
 * guarded: idle, with the SDK's GuardedSessionManager (src/sdk/refused-stream.ts) as the client.
 * Prints one JSON line: rounds, uncaught errors, failed requests.
 */
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { Http2SessionManager } from "@connectrpc/connect-node";
import { GuardedSessionManager } from "../src/sdk/refused-stream.js";

const mode = process.argv[2] === "busy" ? "busy" : process.argv[2] === "guarded" ? "guarded" : "idle";
const rounds = Number(process.argv[3] ?? 50);
const uncaught: string[] = [];
process.on("uncaughtException", (err) => uncaught.push(String(err)));

const server = http2.createServer();
server.on("stream", (stream, headers) => {
  const session = stream.session!;
  if (mode === "busy" && headers[":path"] === "/goaway") {
    // GOAWAY ahead of this stream's answer: the client still has the stream open.
    session.goaway(http2.constants.NGHTTP2_NO_ERROR, 2 ** 31 - 1);
    setTimeout(() => {
      stream.respond({ ":status": 200 });
      stream.end("ok");
    }, 5);
    return;
  }
  stream.respond({ ":status": 200 });
  stream.end("ok");
  if (mode !== "busy" && headers[":path"] === "/goaway") {
    // Once this stream is closed, the session has none open: GOAWAY then.
    stream.once("close", () => session.goaway(http2.constants.NGHTTP2_NO_ERROR, 2 ** 31 - 1));
  }
});
await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

function call(mgr: Http2SessionManager, path: string): Promise<void> {
  return mgr.request("POST", path, {}, {}).then(
    (stream) =>
      new Promise<void>((resolve, reject) => {
        stream.on("error", reject);
        stream.resume();
        stream.on("close", () =>
          stream.rstCode === 0 ? resolve() : reject(new Error(`rst ${stream.rstCode}`)),
        );
        stream.end();
      }),
  );
}

let failed = 0;
for (let i = 0; i < rounds; i++) {
  const mgr = mode === "guarded" ? new GuardedSessionManager(url) : new Http2SessionManager(url);
  await call(mgr, "/").catch(() => failed++);
  const conn = (mgr as unknown as { s: { conn: http2.ClientHttp2Session } }).s.conn;
  // The next request, as the GOAWAY is read (an application calling at that moment).
  const next = new Promise<void>((resolve) => {
    conn.once("goaway", () => {
      setImmediate(() =>
        call(mgr, "/").then(resolve, () => {
          failed++;
          resolve();
        }),
      );
    });
  });
  await call(mgr, "/goaway").catch(() => failed++);
  await next;
  // Let the old session's close (and its error, if any) be emitted.
  await new Promise((r) => setTimeout(r, 20));
  mgr.abort();
}
server.close();
console.log(JSON.stringify({ mode, rounds, uncaught: uncaught.length, failed, first: uncaught[0] }));
