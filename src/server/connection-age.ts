import type { IncomingMessage, ServerResponse } from "node:http";
import http2 from "node:http2";
import type { Socket } from "node:net";
import { MAX_TIMER_MS } from "../clock.js";
import type { Config } from "../config.js";

/**
 * Connections recycled at `server.maxConnectionAgeSeconds`, by protocol, since the start
 * (process-wide; the metrics read it when scraped).
 */
export const connectionsRecycled = { http2: 0, http1: 0 };

/** The largest HTTP/2 stream id: a GOAWAY naming it refuses no stream (RFC 9113 6.8). */
const MAX_STREAM_ID = 2 ** 31 - 1;

/** How long the first GOAWAY's PING may wait for its answer before the second is sent anyway. */
const PING_WAIT_MS = 1000;

/** `ageMs` ± 10 %: connections opened together (a client fleet's restart) do not all reconnect together. */
export function jitteredAge(ageMs: number, random: () => number = Math.random): number {
  // Held to a timer's longest delay (clock.ts): the jitter's +10 % can pass it at the longest
  // age the configuration takes, and a longer timer recycled every connection at once.
  return Math.min(Math.round(ageMs * (0.9 + 0.2 * random())), MAX_TIMER_MS);
}

interface SessionAge {
  aged: boolean;
}

/** A stream the server has not finished answering: its END_STREAM is not queued yet. */
function answering(stream: http2.Http2Stream): boolean {
  return !stream.closed && !stream.destroyed && !stream.writableEnded;
}

/**
 * The two-step GOAWAY, as grpc-go sends it, to a session with a call in progress (see
 * ageConnections for why never to an idle one). A GOAWAY naming the last stream accepted
 * refuses the streams the client opened before it arrived (REFUSED_STREAM, an error for
 * clients that do not retry it, connect-node among them). The first names no limit
 * (2^31-1): the client opens no more streams, and those on their way are still served.
 */
function goaway(session: http2.Http2Session, graceMs: number): void {
  if (session.closed || session.destroyed) return;
  connectionsRecycled.http2++;
  session.goaway(http2.constants.NGHTTP2_NO_ERROR, MAX_STREAM_ID);
  // A Node client answers it with a GOAWAY of its own, sent ahead of the requests it had
  // queued, and Node closes a session whose peer sent GOAWAY, refusing those requests.
  // That close is held until the second GOAWAY.
  let held = true;
  (session as { close: (callback?: () => void) => void }).close = (callback) => {
    if (callback !== undefined) session.once("close", callback);
  };
  const finish = () => {
    if (!held) return;
    held = false;
    clearTimeout(unanswered);
    Reflect.deleteProperty(session, "close");
    if (session.closed || session.destroyed) return;
    // The second GOAWAY names the last stream the client opened; the session closes once
    // its streams are done, or is destroyed after the grace (what is left, cancelled).
    session.close();
    const cut = setTimeout(() => {
      if (!session.destroyed) session.destroy();
    }, graceMs).unref();
    session.once("close", () => clearTimeout(cut));
  };
  // Two PING round trips: a client answers a PING ahead of the requests it queued before
  // reading it, so the second answer comes after every request sent before the first GOAWAY.
  // A client that does not answer in time has had that long to see the first GOAWAY.
  const unanswered = setTimeout(finish, PING_WAIT_MS).unref();
  if (!session.ping(() => session.destroyed || session.ping(finish) || finish())) finish();
}

/**
 * Recycle every connection once it is `maxConnectionAgeSeconds` old (jittered ± 10 %), as
 * gRPC servers' MaxConnectionAge does: behind an L4 load balancer a long-lived connection
 * pins its client to the instance it first reached, so a new or restarted instance gets no
 * share; and a long-lived session's own stream table in node:http2 keeps stale entries alive
 * (bench/results/2026-12-09-pret2.md). HTTP/2: GOAWAY (no new streams; open ones finish) and,
 * `maxConnectionAgeGraceSeconds` later, the session is destroyed with whatever streams it
 * still has (cancelled). HTTP/1.1: see ageHttp1 (closed at once when idle, else after its
 * response in progress, cut after the grace). One timer per
 * connection; per call, a place in its session's open streams (`openStreamsOf`, kept by
 * stream-bounds.ts, a link cleared when the stream closes: a Set of the streams kept up to 63
 * finished calls, ~3.4 KB each, alive per connection). Nothing at all when the age is 0.
 *
 * The first GOAWAY is only ever sent with a call in progress on the session, queued ahead of
 * that call's END_STREAM: at the age if one is, else at the session's next call. connect-node
 * (2.1.2) destroys a session that gets a GOAWAY with no stream of its own open, with an
 * error Node emits only once the socket has closed; a request made meanwhile leaves that
 * session's state and takes its "error" listener off, and the error is thrown uncaught in
 * the client's process (bench/goaway-idle-repro.ts). With a stream open, it keeps the session
 * and its listeners until the session closes, whatever GOAWAYs follow.
 */
export function ageConnections(
  server: http2.Http2SecureServer | http2.Http2Server,
  cfg: Config["server"],
  tls: boolean,
  openStreamsOf: (session: http2.Http2Session) => Iterable<http2.Http2Stream>,
): void {
  const ageMs = cfg.maxConnectionAgeSeconds * 1000;
  if (ageMs === 0) return;
  // Within a timer's range: the configuration bounds it (config/server.ts).
  const graceMs = cfg.maxConnectionAgeGraceSeconds * 1000;
  // Per session: aged (its first GOAWAY is owed).
  const sessions = new WeakMap<http2.Http2Session, SessionAge>();
  const recycleNow = (session: http2.Http2Session) => {
    sessions.delete(session);
    goaway(session, graceMs);
  };
  server.on("session", (session: http2.Http2Session) => {
    const state: SessionAge = { aged: false };
    sessions.set(session, state);
    const recycle = setTimeout(() => {
      if (session.closed || session.destroyed) return;
      for (const stream of openStreamsOf(session)) if (answering(stream)) return recycleNow(session);
      // No call in progress: the first GOAWAY waits for the session's next call (below).
      state.aged = true;
    }, jitteredAge(ageMs));
    // Unref'd: an aged connection never holds the process (shutdown has its own grace).
    recycle.unref();
    session.once("close", () => clearTimeout(recycle));
  });
  // Prepended (before the transport answers): an aged session's GOAWAY is queued ahead of this
  // call's answer, so the client reads it with the call still open.
  server.prependListener("stream", (stream: http2.ServerHttp2Stream) => {
    const state = stream.session === undefined ? undefined : sessions.get(stream.session);
    if (state === undefined) return;
    if (state.aged) recycleNow(stream.session!);
  });
  // HTTP/1.1 (allowHTTP1) only over TLS: Node's plaintext (h2c) server speaks HTTP/2 to every
  // connection, allowHTTP1 or not (an HTTP/1.1 request gets SETTINGS and a GOAWAY), so there
  // is no HTTP/1.1 connection there to age.
  if (tls) ageHttp1(server, ageMs, graceMs);
}

interface Http1Age {
  /** The connection ends after `busy` (or at once, idle): no later request is for it. */
  closing: boolean;
  /** The newest response not yet done: Node answers a connection's requests in order. */
  busy: ServerResponse | undefined;
}

/**
 * HTTP/1.1: at the age an idle connection is ended at once; a busy one ends with its newest
 * response (`Connection: close` when its head is not sent yet), or `graceMs` later with that
 * response cut, as HTTP/2's are (a server stream, e.g. Health/Watch, never ends by itself).
 * A request read after that (pipelined, or sent as the end crossed it) is not processed
 * (RFC 9112 9.6): Node would run its handler and never send the answer, so a client retrying
 * it, as it may when the connection closes unanswered (9.3.2), would run it twice. Not emitted
 * as "request" at all: a listener cannot stop the ones after it.
 */
function ageHttp1(server: http2.Http2SecureServer | http2.Http2Server, ageMs: number, graceMs: number): void {
  const http1 = new WeakMap<Socket, Http1Age>();
  server.on("secureConnection", (socket: Socket & { alpnProtocol?: string | false }) => {
    if (socket.alpnProtocol === "h2") return;
    const state: Http1Age = { closing: false, busy: undefined };
    http1.set(socket, state);
    let cut: NodeJS.Timeout | undefined;
    const recycle = setTimeout(() => {
      if (socket.destroyed) return;
      state.closing = true;
      connectionsRecycled.http1++;
      const res = state.busy;
      // Cut after the grace either way: an idle client that ignores the end would keep it half-open.
      cut = setTimeout(() => socket.destroy(), graceMs).unref();
      if (res === undefined) socket.end();
      else if (!res.headersSent) res.setHeader("connection", "close");
    }, jitteredAge(ageMs));
    // Unref'd: an aged connection never holds the process (shutdown has its own grace).
    recycle.unref();
    socket.once("close", () => {
      clearTimeout(recycle);
      clearTimeout(cut);
    });
  });
  // Ahead of every "request" listener: the request handler may answer at once (/health, CORS
  // preflight), and a header set after that throws ERR_HTTP_HEADERS_SENT, uncaught.
  const admit = (req: IncomingMessage, res: ServerResponse): boolean => {
    if (req.httpVersionMajor !== 1) return true;
    const state = http1.get(req.socket);
    if (state === undefined) return true;
    if (state.closing) return false;
    state.busy = res;
    res.once("close", () => {
      if (state.busy !== res) return;
      state.busy = undefined;
      // Aged while its head was already sent: the connection ends with it.
      if (state.closing && !req.socket.destroyed) req.socket.end();
    });
    return true;
  };
  const emit = server.emit;
  // Every event passes here, HTTP/2 calls' too: no rest parameters or spread (two arrays per event).
  server.emit = function (
    this: typeof server,
    event: string | symbol,
    req?: unknown,
    res?: unknown,
  ): boolean {
    if (event === "request" && !admit(req as IncomingMessage, res as ServerResponse)) return false;
    // biome-ignore lint/complexity/noArguments: forwards every argument without copying them
    return Reflect.apply(emit, this, arguments) as boolean;
  } as typeof server.emit;
}
