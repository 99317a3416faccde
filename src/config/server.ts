// The public port's keys: where it listens, TLS, the transport, proxies, and the bounds every
// connection and call is held to before any authentication (plus the browser-facing CORS).
import { z } from "zod";
import { MAX_TIMER_MS } from "../clock.js";
import { parseCidr } from "./addresses.js";
import { configKeys } from "./key-docs.js";

// setTimeout's longest delay, in whole seconds: a duration past it would close every
// connection or stream at once, not never.
const TIMER_MAX_SECONDS = Math.floor(MAX_TIMER_MS / 1000);

/** `server.*`: the listener, its TLS and the per-connection and per-call bounds. */
export const serverSchema = z
  .object({
    host: z
      .string()
      .min(1)
      .default("0.0.0.0")
      .register(configKeys, { env: "TESSERA_HOST", description: "Address to listen on." }),
    port: z.number().int().min(0).max(65535).default(50052).register(configKeys, {
      env: "TESSERA_PORT",
      description: "Port serving gRPC, gRPC-Web and Connect (0 picks a free one).",
    }),
    certDir: z.string().min(1).default("./certs").register(configKeys, {
      env: "TESSERA_CERT_DIR",
      description:
        "Folder with ca.crt, server.crt, server.key (and optionally ca.key, ca.crl). A server.key or ca.key any user of the machine can read or write (o+r, o+w) stops the start: chmod 600 (640 for a group); a Kubernetes secret volume needs defaultMode: 0400 (or 0440 with fsGroup), a rootless podman bind mount --userns=keep-id. On a reload such a key is loaded with a warning.",
    }),
    mtls: z.enum(["off", "optional", "require"]).default("optional").register(configKeys, {
      env: "TESSERA_MTLS",
      description:
        "Client certificates: off, optional (verified ones identify the caller) or require (handshake fails without one).",
    }),
    insecurePlaintext: z.boolean().default(false).register(configKeys, {
      env: "TESSERA_INSECURE_PLAINTEXT",
      description: "Serve without TLS (h2c and HTTP/1.1). Development only.",
    }),
    transport: z.enum(["fast", "connect"]).default("fast").register(configKeys, {
      env: "TESSERA_TRANSPORT",
      description:
        "What serves RPCs on the port: fast (Tessera's own bridge to Node, unary calls answered from the HTTP/2 stream) or connect (connect-node's stock connectNodeAdapter). Both answer every call the same way; fast costs less CPU per call.",
    }),
    devCertificates: z.boolean().default(true).register(configKeys, {
      env: "TESSERA_DEV_CERTIFICATES",
      description: "Generate a development CA and server certificate when certDir has none.",
    }),
    allowLoopbackHttpCallbacks: z.boolean().default(false).register(configKeys, {
      env: "TESSERA_ALLOW_LOOPBACK_HTTP_CALLBACKS",
      description: "Accept http:// backend callback URLs to loopback hosts (development).",
    }),
    trustProxy: z.boolean().default(false).register(configKeys, {
      env: "TESSERA_TRUST_PROXY",
      description:
        "Shorthand: the direct peer, whatever its address, is a trusted proxy (see server.trustedProxies).",
    }),
    trustedProxies: z
      .array(
        z.string().refine((v) => parseCidr(v) !== null, {
          message: "expected an IP address or CIDR block (e.g. 10.0.0.0/8, fd00::/8)",
        }),
      )
      .default([])
      .register(configKeys, {
        env: "TESSERA_TRUSTED_PROXIES",
        description:
          "Comma-separated addresses or CIDR blocks of trusted proxies. Only from such a peer is the forwarding header (server.forwardedHeader) read: the client IP is the rightmost address in it that is not a trusted proxy.",
      }),
    forwardedHeader: z
      .enum(["x-forwarded-for", "forwarded"])
      .default("x-forwarded-for")
      .register(configKeys, {
        env: "TESSERA_FORWARDED_HEADER",
        description:
          "The forwarding header trusted proxies write: x-forwarded-for or forwarded (RFC 7239). Only that one is read, never the other as a fallback.",
      }),
    readMaxBytes: z
      .number()
      .int()
      .positive()
      // Every Tessera request message is tiny; a large cap lets a small gzip body
      // inflate into megabytes of memory per call before authentication.
      .default(64 * 1024)
      .register(configKeys, {
        env: "TESSERA_READ_MAX_BYTES",
        description:
          "Largest request message accepted, counted after decompression (decompression stops as soon as it is passed; at most `server.maxBodyBytes`); a larger one is refused with ResourceExhausted.",
      }),
    maxConcurrentStreams: z.number().int().positive().default(256).register(configKeys, {
      env: "TESSERA_MAX_CONCURRENT_STREAMS",
      description: "HTTP/2 streams per connection.",
    }),
    maxHeaderListSize: z
      .number()
      .int()
      .positive()
      .default(32 * 1024)
      .register(configKeys, {
        env: "TESSERA_MAX_HEADER_LIST_SIZE",
        description: "Largest header block accepted.",
      }),
    maxBodyBytes: z
      .number()
      .int()
      .positive()
      .default(128 * 1024)
      .register(configKeys, {
        env: "TESSERA_MAX_BODY_BYTES",
        description:
          "Largest request body accepted, all messages and envelopes counted (every protocol); a larger one is refused with ResourceExhausted and its stream reset.",
      }),
    idleTimeoutSeconds: z.number().int().min(0).max(TIMER_MAX_SECONDS).default(60).register(configKeys, {
      env: "TESSERA_IDLE_TIMEOUT_SECONDS",
      description:
        "A connection with no traffic for this long is closed (HTTP/2: GOAWAY first; a call whose client stalls mid-request is cancelled); also the TLS handshake timeout. 0 keeps idle connections.",
    }),
    // Off by default, as in grpc-go and grpc-js: a recycled connection costs its client a TLS
    // handshake and cuts streams older than the grace; behind an L4 load balancer, set it.
    maxConnectionAgeSeconds: z.number().int().min(0).max(TIMER_MAX_SECONDS).default(0).register(configKeys, {
      env: "TESSERA_MAX_CONNECTION_AGE_SECONDS",
      description:
        "Recycle a connection once it is this old (± 10 %, so connections opened together do not all reconnect together), as gRPC's MaxConnectionAge: behind an L4 load balancer, long-lived connections otherwise pin clients to the instance they first reached, and a new or restarted instance gets none of them. HTTP/2: GOAWAY (calls in flight finish, clients open a new connection for the next ones), sent only with a call in progress, so a connection idle at its age is recycled at its next call; HTTP/1.1: closed when idle, else after its response (Connection: close; a request pipelined behind it is not processed) or the grace. Counted in tessera_connections_recycled_total. Behind an L4 load balancer, a few minutes to an hour (e.g. 1800). 0: connections live as long as they are used.",
    }),
    // A minute: unary calls finish long before it; streaming calls are cut after it anyway.
    maxConnectionAgeGraceSeconds: z
      .number()
      .int()
      .min(0)
      .max(TIMER_MAX_SECONDS)
      .default(60)
      .register(configKeys, {
        env: "TESSERA_MAX_CONNECTION_AGE_GRACE_SECONDS",
        description:
          "After server.maxConnectionAgeSeconds sent its GOAWAY (HTTP/1.1: found a response under way): seconds the calls still open on the connection get to finish; then it is closed and what is left is cancelled (streaming calls, e.g. Health/Watch and WatchRevocations, whose clients reconnect and resume).",
      }),
    maxConnections: z.number().int().min(0).default(10_000).register(configKeys, {
      env: "TESSERA_MAX_CONNECTIONS",
      description:
        "Open connections in total; more are closed at once, before TLS (counted, as every connection refused before TLS, in tessera_connections_refused_total). 0: no limit.",
    }),
    maxConnectionsPerIp: z.number().int().min(0).default(1024).register(configKeys, {
      env: "TESSERA_MAX_CONNECTIONS_PER_IP",
      description:
        "Open connections per peer address (an IPv6 peer's whole /64; the proxy's, behind one); more are closed at once, before TLS. 0: no limit.",
    }),
    newConnectionsPerIpPerSecond: z.number().int().min(0).default(200).register(configKeys, {
      env: "TESSERA_NEW_CONNECTIONS_PER_IP_PER_SECOND",
      description:
        "New connections accepted per second per peer address (an IPv6 peer's whole /64; the proxy's, behind one): each costs a TLS handshake, which server.maxConnectionsPerIp does not bound once connections close as fast as they open. More are closed at once, before TLS. 0: no limit.",
    }),
    // 64 connections' worth of the per-connection default (256): far past what one NAT'd
    // address of real clients keeps open, a 16th of what maxConnectionsPerIp × 256 allowed.
    maxOpenStreamsPerIp: z.number().int().min(0).default(16_384).register(configKeys, {
      env: "TESSERA_MAX_OPEN_STREAMS_PER_IP",
      description:
        "HTTP/2 streams (calls of every kind, held or not) open at once per peer address (an IPv6 peer's whole /64; the proxy's, behind one), over all its connections: server.maxConcurrentStreams bounds them per connection only. More are refused with RST_STREAM REFUSED_STREAM before any of their call runs, which clients may retry at once (gRPC clients do, once), counted in tessera_streams_refused_total. The default is 64 connections of 256 streams each, far more than the clients behind one NAT hold. 0: no limit.",
    }),
    requestTimeoutSeconds: z.number().int().min(0).max(TIMER_MAX_SECONDS).default(10).register(configKeys, {
      env: "TESSERA_REQUEST_TIMEOUT_SECONDS",
      description:
        "Time a client has to send a request's headers and body, however slowly it trickles them: past it the call is cancelled (HTTP/2 RST_STREAM CANCEL; HTTP/1.1: the connection is closed). Also bounds the client's half of a client or bidi stream (reflection). 0: no limit.",
    }),
    maxStreamSeconds: z
      .number()
      .int()
      .min(0)
      .max(TIMER_MAX_SECONDS - 1)
      .default(3600)
      .register(configKeys, {
        env: "TESSERA_MAX_STREAM_SECONDS",
        description:
          "Longest life of a streaming call (e.g. grpc.health.v1.Health/Watch): Watch then ends with OK, and any other stream still open is cancelled; clients reconnect. 0: no limit.",
      }),
    maxStreamsPerIp: z.number().int().min(0).default(64).register(configKeys, {
      env: "TESSERA_MAX_STREAMS_PER_IP",
      description:
        "Streaming calls open at once per client address (an IPv6 client's whole /64), over all its connections; more are refused with ResourceExhausted, reason RATE_LIMITED and Retry-After: 1. 0: no limit.",
    }),
    maxStreamMessages: z.number().int().min(0).default(100).register(configKeys, {
      env: "TESSERA_MAX_STREAM_MESSAGES",
      description:
        "Request messages a client may send on one client or bidi stream (gRPC server reflection); the next ends the stream with ResourceExhausted, reason MESSAGE_TOO_LARGE. Each message after the first is also counted against rateLimit.perIpPerMinute, as a call of its own. 0: no limit on the count.",
    }),
    // Below the 90 s a systemd unit waits by default (TimeoutStopSec) and the 30 s of
    // Kubernetes' terminationGracePeriodSeconds, with room left for the flush after it.
    shutdownGraceSeconds: z.number().int().min(0).max(3600).default(10).register(configKeys, {
      env: "TESSERA_SHUTDOWN_GRACE_SECONDS",
      description:
        "On SIGTERM or SIGINT: seconds in-flight calls get to finish once the port is closed and HTTP/2 clients have been sent GOAWAY; connections still open after it are cut, then audit events and last-used times are flushed and the database closed.",
    }),
    // 0: the port closes at once (a refused connection is the load balancer's signal).
    drainDelaySeconds: z.number().int().min(0).max(300).default(0).register(configKeys, {
      env: "TESSERA_DRAIN_DELAY_SECONDS",
      description:
        "On SIGTERM or SIGINT, /ready answers 503 at once; for these seconds everything else is still served, new connections included, before the port closes and server.shutdownGraceSeconds begins. Behind a load balancer or Kubernetes, set it to the time they take to stop routing to an instance whose /ready fails (probe period × failure threshold, a few seconds). 0: the port closes at once.",
    }),
  })
  .strict()
  .prefault({});

/** `cors.*`: which browser origins may call the public port. */
export const corsSchema = z
  .object({
    allowedOrigins: z.array(z.string()).default([]).register(configKeys, {
      env: "TESSERA_CORS_ALLOWED_ORIGINS",
      description: "Comma-separated origins allowed by CORS; * for any (development only).",
    }),
    maxAge: z.number().int().min(0).default(86400).register(configKeys, {
      env: "TESSERA_CORS_MAX_AGE",
      description: "Access-Control-Max-Age in seconds.",
    }),
  })
  .strict()
  .prefault({});
