import http2 from "node:http2";
import type { Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import { budgetKey } from "../client-ip.js";
import type { Clock } from "../clock.js";
import type { Config } from "../config.js";
import { type RefusalLogger, refusalCounter } from "./refusals.js";
import { boundStreams } from "./stream-bounds.js";

/**
 * Bound what connections can hold: at most `maxConnections` in all and
 * `maxConnectionsPerIp` per peer address (more are closed at once, before any TLS work),
 * and none kept idle for longer than `idleTimeoutSeconds` (HTTP/2: GOAWAY, then closed
 * once no stream is left; HTTP/1.1: closed). Node keeps idle connections for ever by
 * default, each holding a descriptor and tens of KB. A request must arrive whole within
 * `requestTimeoutSeconds` (a body trickled a byte at a time keeps a connection busy, so
 * the idle timeout alone does not end it), no stream lives past `maxStreamSeconds`, and an
 * address holds at most `maxOpenStreamsPerIp` HTTP/2 streams at once (stream-bounds.ts).
 * Returns the number of connections open from an address, as counted for the limit, and of
 * HTTP/2 streams. `streamClosed`, when given, is called as each HTTP/2 stream closes, from the
 * bounds' own "close" listener (a stream's third listener grew the pair events.js keeps them in).
 */
export function boundConnections(
  server: http2.Http2SecureServer | http2.Http2Server,
  cfg: Config["server"],
  tls: boolean,
  refusals?: { logger: RefusalLogger; clock: Clock },
  streamClosed?: () => void,
): {
  connectionsFrom(ip: string): number;
  openStreamsFrom(ip: string): number;
  /** A session's open streams (with `idleTimeoutSeconds` or `maxConnectionAgeSeconds` set; else none). */
  openStreamsOf(session: http2.Http2Session): Iterable<http2.Http2Stream>;
} {
  const refuse = refusalCounter(server, refusals);
  const open = new Map<string, number>();
  // By peer address and port: how a TLS socket finds its raw socket's count.
  const releases = new Map<string, () => void>();
  // The one per-stream listener (request deadline, stream lifetime, the address's open
  // streams, and the open streams of each session that the idle timeout looks at):
  // per-stream listeners and timers are a cost every call pays, so each stream gets at most
  // one "close" listener and one timer.
  const { sessions: streamsOf, openStreamsFrom } = boundStreams(server, cfg, refuse, streamClosed);
  const openStreamsOf = (session: http2.Http2Session): Iterable<http2.Http2Stream> =>
    streamsOf.get(session)?.open ?? [];
  // net.Server closes connections past it as they are accepted (and says so: "drop").
  if (cfg.maxConnections > 0) {
    server.maxConnections = cfg.maxConnections;
    server.on("drop", () => refuse("total"));
  }
  const newPerSecond = cfg.newConnectionsPerIpPerSecond;
  const admitNew = newPerSecond > 0 ? newConnectionRate(newPerSecond) : undefined;
  if (admitNew !== undefined && cfg.maxConnectionsPerIp === 0)
    server.prependListener("connection", (socket: Socket) => {
      if (!admitNew(budgetKey(socket.remoteAddress ?? "unknown"))) {
        refuse("rate");
        socket.destroy();
      }
    });
  if (cfg.maxConnectionsPerIp > 0) {
    const limit = cfg.maxConnectionsPerIp;
    // Prepended: decided before the TLS layer's own listener starts a handshake.
    server.prependListener("connection", (socket: Socket) => {
      // Counted per /64 for IPv6 (budgetKey): one client holds a whole /64, and per /128 it
      // would open 2^64 times the limit.
      const ip = budgetKey(socket.remoteAddress ?? "unknown");
      if (admitNew !== undefined && !admitNew(ip)) {
        refuse("rate");
        socket.destroy();
        return;
      }
      const n = (open.get(ip) ?? 0) + 1;
      if (n > limit) {
        refuse("per_ip");
        socket.destroy();
        return;
      }
      open.set(ip, n);
      const peer = `${socket.remoteAddress ?? "unknown"}|${socket.remotePort}`;
      let counted = true;
      const release = () => {
        if (!counted) return;
        counted = false;
        releases.delete(peer);
        const left = (open.get(ip) ?? 1) - 1;
        if (left === 0) open.delete(ip);
        else open.set(ip, left);
      };
      releases.set(peer, release);
      socket.once("close", release);
    });
    // The TLS socket takes the raw socket's handle over: destroyed itself (an idle close),
    // its "close" is not always seen on the raw socket, and the address stayed counted.
    if (tls) {
      const watch = (socket: TLSSocket) => {
        const release = releases.get(`${socket.remoteAddress ?? "unknown"}|${socket.remotePort}`);
        if (release === undefined) return;
        if (socket.destroyed) release();
        else socket.once("close", release);
      };
      server.on("secureConnection", watch);
      // A handshake that fails or times out never reaches "secureConnection": its TLS socket
      // is handed over here, or the address stays counted for ever.
      server.on("tlsClientError", (_err: Error, socket: TLSSocket) => watch(socket));
    }
  }
  const connectionsFrom = (ip: string) => open.get(budgetKey(ip)) ?? 0;
  const idleMs = cfg.idleTimeoutSeconds * 1000;
  if (idleMs === 0) return { connectionsFrom, openStreamsFrom, openStreamsOf };
  // The TLS socket of each HTTP/2 session (the session only hands out a proxy that cannot
  // destroy it): node:http2 emits "session" from its own "secureConnection" listener, which
  // runs before ours, so ours pairs the socket with the session made just before.
  const socketOf = new WeakMap<http2.Http2Session, TLSSocket>();
  const tlsByPeer = new Map<string, TLSSocket>();
  let lastSession: http2.Http2Session | undefined;
  /** GOAWAY, close, and a hard close one idle period later (see below). */
  const closeIdle = (session: http2.Http2Session) => {
    session.goaway(http2.constants.NGHTTP2_NO_ERROR);
    session.close();
    // A peer that never sent its preface (or never reads) leaves data pending, and close()
    // (even destroy()) then waits for ever on the socket, holding it and its per-IP count.
    // Paired by "session" order, or else by the peer's address and port (the pairing by order
    // can miss under load, and the socket then stayed open, counted, for ever).
    const peer = session.socket ? `${session.socket.remoteAddress}|${session.socket.remotePort}` : "";
    const socket = socketOf.get(session) ?? tlsByPeer.get(peer);
    if (socket !== undefined)
      setTimeout(() => {
        if (!socket.destroyed) socket.destroy();
      }, idleMs).unref();
  };
  server.on("session", (session: http2.Http2Session) => {
    lastSession = session;
    // Filled and emptied by the per-stream listener of boundStreams, whose "session" listener
    // ran first.
    const streams: Iterable<http2.Http2Stream> = streamsOf.get(session)?.open ?? [];
    // Fires after `idleMs` without a frame either way. A stream whose client still owes its
    // request (a body begun and stalled) is cancelled: it cannot hold the connection. One
    // whose request is complete (a call in progress, a server stream) keeps the session,
    // and the timer runs again after its next frame.
    // "on", not setTimeout's callback: that is a once listener, so a timeout that found the
    // session busy was its last, and the connection was kept for ever after its long call.
    session.on("timeout", () => {
      if (session.destroyed) return;
      // Closed (by us or by the peer's GOAWAY) yet still here an idle period later: its peer
      // neither finishes nor reads. End the connection, or its address stays counted.
      if (session.closed) {
        const peer = session.socket ? `${session.socket.remoteAddress}|${session.socket.remotePort}` : "";
        const socket = socketOf.get(session) ?? tlsByPeer.get(peer);
        if (socket !== undefined) socket.destroy();
        else session.destroy();
        return;
      }
      let busy = false;
      for (const stream of streams) {
        // A stream whose client still owes part of its request, or has not taken what was
        // written to it for a whole idle period (a zero window: a slow reader), is cancelled.
        if (stream.state.remoteClose !== 1 || stream.bufferSize > 0)
          stream.close(http2.constants.NGHTTP2_CANCEL);
        else busy = true;
      }
      if (!busy) closeIdle(session);
    });
    session.setTimeout(idleMs);
    // Frames keep the timeout above from firing: a peer that sends PINGs while taking none of
    // the answers it asked for (a zero window) held every such stream until maxStreamSeconds.
    // So the answers are also looked at every idle period: one with bytes waiting that did
    // not shrink over a whole period is cancelled, whatever else the connection carries.
    const waiting = new WeakMap<http2.Http2Stream, number>();
    const stuck = setInterval(() => {
      for (const stream of streams) {
        const pending = stream.bufferSize;
        const before = waiting.get(stream);
        if (pending > 0 && before !== undefined && pending >= before)
          stream.close(http2.constants.NGHTTP2_CANCEL);
        else if (pending > 0) waiting.set(stream, pending);
        else waiting.delete(stream);
      }
    }, idleMs).unref();
    session.once("close", () => clearInterval(stuck));
  });
  // HTTP/1.1 (allowHTTP1): an idle keep-alive connection is closed.
  if (tls)
    server.on("secureConnection", (socket: TLSSocket) => {
      const session = lastSession;
      lastSession = undefined;
      const peer = `${socket.remoteAddress}|${socket.remotePort}`;
      tlsByPeer.set(peer, socket);
      socket.once("close", () => {
        if (tlsByPeer.get(peer) === socket) tlsByPeer.delete(peer);
      });
      if (socket.alpnProtocol !== "h2") socket.setTimeout(idleMs, () => socket.destroy());
      else if (session !== undefined && session.socket?.remotePort === socket.remotePort)
        socketOf.set(session, socket);
    });
  return { connectionsFrom, openStreamsFrom, openStreamsOf };
}

/**
 * Admit at most `perSecond` new connections per address in each second. Forgotten every
 * second, so it holds at most the addresses that connected within one.
 */
export function newConnectionRate(perSecond: number, now: () => number = Date.now): (ip: string) => boolean {
  const counts = new Map<string, number>();
  let windowStart = Number.NEGATIVE_INFINITY;
  return (ip) => {
    const t = now();
    if (t - windowStart >= 1000) {
      counts.clear();
      windowStart = t;
    }
    const n = (counts.get(ip) ?? 0) + 1;
    if (n > perSecond) return false;
    counts.set(ip, n);
    return true;
  };
}
