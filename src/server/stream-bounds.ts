import type { IncomingMessage } from "node:http";
import http2 from "node:http2";
import { budgetKey } from "../client-ip.js";
import type { Config } from "../config.js";
import type { NodeResponse as Response } from "../transport/stream-server.js";
import { type OpenStreamLink, OpenStreams } from "./open-streams.js";
import type { ConnectionRefusal } from "./refusals.js";

/**
 * What every HTTP/2 stream is held to, whatever it carries: its request must arrive in time,
 * it may not live for ever, and its peer address may hold only so many at once. One listener
 * per stream and one per session (see {@link onBoundedStreamClose} for why no more).
 */

/** The HTTP/2 streams open from one peer address (its /64 for IPv6), over all its sessions. */
class PeerStreams {
  open = 0;
  sessions = 1;

  constructor(
    private readonly key: string,
    private readonly all: Map<string, PeerStreams>,
  ) {}

  /** Forgotten once it has neither a session nor a stream left. */
  forgetIfUnused(): void {
    if (this.open === 0 && this.sessions === 0 && this.all.get(this.key) === this) this.all.delete(this.key);
  }
}

/** What the bounds keep per HTTP/2 session, found with one lookup per stream. */
export interface SessionStreams {
  /** Its open streams, for the idle timeout (connection-limits.ts) or the age (connection-age.ts), when there is one. */
  readonly open: OpenStreams | undefined;
  /** Its peer address's open streams, when `server.maxOpenStreamsPerIp` bounds them. */
  readonly peer: PeerStreams | undefined;
}

const kBounds = Symbol("tessera.streamBounds");
interface StreamBounds extends OpenStreamLink {
  timer: NodeJS.Timeout | undefined;
  open: OpenStreams | undefined;
  peer: PeerStreams | undefined;
  closed: (() => void) | undefined;
}
type BoundedStream = http2.Http2Stream & { [kBounds]?: StreamBounds };

/**
 * The "close" listener of every bounded stream: one function, its state on the stream. The
 * stream's body already listens for "close", so Node's events.js holds both listeners in a
 * two-element array from the one literal site all emitters share; when V8 pretenures that site
 * at start-up (at random), the array is born old, and a per-stream closure in it kept the
 * whole call alive through every scavenge (bench/results/2026-12-08-json-cut.md, "Which site").
 */
function onBoundedStreamClose(this: BoundedStream): void {
  const bounds = this[kBounds];
  if (bounds === undefined) return;
  if (bounds.timer !== undefined) clearTimeout(bounds.timer);
  bounds.open?.delete(bounds);
  const peer = bounds.peer;
  if (peer !== undefined) {
    peer.open--;
    peer.forgetIfUnused();
  }
  bounds.closed?.();
}

function ignoreRefusedStreamError(): void {}

/**
 * Cancel a request not received whole within `requestTimeoutSeconds` of its start, and a
 * stream still open `maxStreamSeconds` after it (a streaming call whose handler did not
 * end it first, as Health/Watch does with OK). One timer per stream, unref'd. Refuse a
 * stream past `maxOpenStreamsPerIp` open from its peer address (RST_STREAM REFUSED_STREAM,
 * counted by `refuse`). Keeps, per session, the open streams the idle timeout and the age look
 * at (when `idleTimeoutSeconds` or `maxConnectionAgeSeconds` is set), all with the same one
 * "close" listener. Returns the
 * sessions' state and the count of streams open from an address (0 when not bounded).
 */
export function boundStreams(
  server: http2.Http2SecureServer | http2.Http2Server,
  cfg: Config["server"],
  refuse: (why: ConnectionRefusal) => void,
  streamClosed: (() => void) | undefined,
): { sessions: WeakMap<http2.Http2Session, SessionStreams>; openStreamsFrom(ip: string): number } {
  const sessions = new WeakMap<http2.Http2Session, SessionStreams>();
  const peers = new Map<string, PeerStreams>();
  const openStreamsFrom = (ip: string) => peers.get(budgetKey(ip))?.open ?? 0;
  const limit = cfg.maxOpenStreamsPerIp > 0 ? cfg.maxOpenStreamsPerIp : 0;
  const idle = cfg.idleTimeoutSeconds > 0 || cfg.maxConnectionAgeSeconds > 0;
  if (limit > 0 || idle)
    server.on("session", (session: http2.Http2Session) => {
      let peer: PeerStreams | undefined;
      if (limit > 0) {
        // Counted per /64 for IPv6 (budgetKey), as connections are: one client holds a whole /64.
        const key = budgetKey(session.socket?.remoteAddress ?? "unknown");
        const known = peers.get(key);
        const counted = known ?? new PeerStreams(key, peers);
        if (known === undefined) peers.set(key, counted);
        else counted.sessions++;
        session.once("close", () => {
          counted.sessions--;
          counted.forgetIfUnused();
        });
        peer = counted;
      }
      sessions.set(session, { open: idle ? new OpenStreams() : undefined, peer });
    });
  const requestMs = cfg.requestTimeoutSeconds * 1000;
  // A moment past the limit, so a handler ending its stream at the limit does so cleanly first.
  const lifeMs = cfg.maxStreamSeconds > 0 ? cfg.maxStreamSeconds * 1000 + 1000 : 0;
  const timed = requestMs > 0 || lifeMs > 0;
  boundHttp1Requests(server, requestMs);
  if (!timed && !idle && limit === 0 && streamClosed === undefined) return { sessions, openStreamsFrom };
  // Prepended: a refused stream is closed before the transport's listener, which then leaves it.
  server.prependListener("stream", (stream: http2.ServerHttp2Stream) => {
    const of = stream.session === undefined ? undefined : sessions.get(stream.session);
    const peer = of?.peer;
    if (peer !== undefined && peer.open >= limit) {
      // REFUSED_STREAM: nothing of the call was done, so any client may retry it (RFC 9113
      // 8.7; gRPC clients retry it at once, once); no answer is built for a flood.
      // Node destroys a stream reset with any code but CANCEL with an "error": no one else
      // listens to this one, and unheard that error is thrown.
      stream.on("error", ignoreRefusedStreamError);
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      refuse("open_streams_per_ip");
      // Still told to `streamClosed` when it closes: the server counted it in flight.
      if (streamClosed !== undefined) {
        (stream as BoundedStream)[kBounds] = {
          stream,
          prev: undefined,
          next: undefined,
          timer: undefined,
          open: undefined,
          peer: undefined,
          closed: streamClosed,
        };
        stream.on("close", onBoundedStreamClose);
      }
      return;
    }
    if (peer !== undefined) peer.open++;
    const open = of?.open;
    const bounds: StreamBounds = {
      stream,
      prev: undefined,
      next: undefined,
      timer: undefined,
      open,
      peer,
      closed: streamClosed,
    };
    open?.add(bounds);
    if (timed) {
      const cancel = () => {
        if (!stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
      };
      if (requestMs > 0 && (lifeMs === 0 || requestMs < lifeMs))
        bounds.timer = setTimeout(() => {
          // The client still owes part of its request: a stalled or trickled upload.
          if (stream.state.remoteClose !== 1) cancel();
          else if (lifeMs > 0) bounds.timer = setTimeout(cancel, lifeMs - requestMs).unref();
        }, requestMs).unref();
      else bounds.timer = setTimeout(cancel, lifeMs).unref();
    }
    if (bounds.timer === undefined && open === undefined && peer === undefined && streamClosed === undefined)
      return;
    (stream as BoundedStream)[kBounds] = bounds;
    // "on", not "once": a stream closes once, and once's wrapper is a cost per call.
    stream.on("close", onBoundedStreamClose);
  });
  return { sessions, openStreamsFrom };
}

/** The same request deadline for HTTP/1.1 (allowHTTP1): one request at a time per connection. */
function boundHttp1Requests(server: http2.Http2SecureServer | http2.Http2Server, requestMs: number): void {
  // Headers trickled in never reach "request" below, and every byte resets the idle timeout;
  // only Node's own headersTimeout ends them (60 s, looked at every 30 s, so 90 s per
  // connection). Held to the same limit, looked at twice per period. Read by Node when the
  // server starts listening; the h2c server has no such check.
  const http1 = server as unknown as { headersTimeout?: number; connectionsCheckingInterval?: number };
  if (
    requestMs > 0 &&
    http1.headersTimeout !== undefined &&
    http1.connectionsCheckingInterval !== undefined
  ) {
    http1.headersTimeout = Math.min(http1.headersTimeout, requestMs);
    http1.connectionsCheckingInterval = Math.min(
      http1.connectionsCheckingInterval,
      Math.max(1000, Math.ceil(requestMs / 2)),
    );
  }
  // A request whose body has not arrived in time loses its connection.
  if (requestMs > 0)
    server.on("request", (req: IncomingMessage | http2.Http2ServerRequest, res: Response) => {
      if (req.httpVersion.startsWith("2")) return;
      const timer = setTimeout(() => {
        if (!req.complete) req.socket.destroy();
      }, requestMs).unref();
      res.once("close", () => clearTimeout(timer));
    });
}
