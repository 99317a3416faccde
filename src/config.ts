import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import { parse as parseYaml } from "yaml";
import { z } from "zod";

/**
 * Tessera's configuration: a YAML file (path from `--config` or `TESSERA_CONFIG`)
 * overridden key by key by environment variables. Every key, its default and the
 * variable that overrides it are listed in {@link CONFIG_REFERENCE} (rendered in
 * docs/configuration.md, kept in sync by a test). Unknown keys are errors, so a typo
 * never silently falls back to a default.
 */

const seconds = z.number().int().positive();

/**
 * An IP address or CIDR block as [address, prefix, family], or null when it is neither.
 * (net.BlockList does the matching; it needs the parts apart.)
 */
export function parseCidr(value: string): [string, number, "ipv4" | "ipv6"] | null {
  const [address = "", prefixText, extra] = value.trim().split("/");
  if (extra !== undefined) return null;
  const family = isIP(address);
  if (family === 0) return null;
  const max = family === 4 ? 32 : 128;
  const prefix = prefixText === undefined ? max : Number(prefixText);
  if (!/^\d+$/.test(prefixText ?? String(max)) || prefix > max) return null;
  return [address, prefix, family === 4 ? "ipv4" : "ipv6"];
}

const ConfigSchema = z
  .object({
    server: z
      .object({
        host: z.string().min(1).default("0.0.0.0"),
        port: z.number().int().min(0).max(65535).default(50052),
        certDir: z.string().min(1).default("./certs"),
        mtls: z.enum(["off", "optional", "require"]).default("optional"),
        insecurePlaintext: z.boolean().default(false),
        transport: z.enum(["fast", "connect"]).default("fast"),
        devCertificates: z.boolean().default(true),
        allowLoopbackHttpCallbacks: z.boolean().default(false),
        trustProxy: z.boolean().default(false),
        trustedProxies: z
          .array(
            z.string().refine((v) => parseCidr(v) !== null, {
              message: "expected an IP address or CIDR block (e.g. 10.0.0.0/8, fd00::/8)",
            }),
          )
          .default([]),
        forwardedHeader: z.enum(["x-forwarded-for", "forwarded"]).default("x-forwarded-for"),
        readMaxBytes: z
          .number()
          .int()
          .positive()
          // Every Tessera request message is tiny; a large cap lets a small gzip body
          // inflate into megabytes of memory per call before authentication.
          .default(64 * 1024),
        maxConcurrentStreams: z.number().int().positive().default(256),
        maxHeaderListSize: z
          .number()
          .int()
          .positive()
          .default(32 * 1024),
        maxBodyBytes: z
          .number()
          .int()
          .positive()
          .default(128 * 1024),
        idleTimeoutSeconds: z.number().int().min(0).default(60),
        maxConnections: z.number().int().min(0).default(10_000),
        maxConnectionsPerIp: z.number().int().min(0).default(1024),
        requestTimeoutSeconds: z.number().int().min(0).default(10),
        maxStreamSeconds: z.number().int().min(0).default(3600),
        maxStreamsPerIp: z.number().int().min(0).default(64),
        // Below the 90 s a systemd unit waits by default (TimeoutStopSec) and the 30 s of
        // Kubernetes' terminationGracePeriodSeconds, with room left for the flush after it.
        shutdownGraceSeconds: z.number().int().min(0).max(3600).default(10),
        // 0: the port closes at once (a refused connection is the load balancer's signal).
        drainDelaySeconds: z.number().int().min(0).max(300).default(0),
      })
      .strict()
      .prefault({}),
    database: z
      .object({
        url: z.string().min(1).default("sqlite:./data/tessera.db"),
        debug: z.boolean().default(false),
        stateCacheSize: z.number().int().min(0).default(10_000),
        // PostgreSQL only (SQLite is in-process): a database that stops answering must become
        // Unavailable within a bound, not hang calls (see storage/pg-bounds.ts).
        statementTimeoutMs: z.number().int().min(0).max(600_000).default(5_000),
        connectTimeoutMs: z.number().int().positive().max(120_000).default(5_000),
        barrierTimeoutMs: z.number().int().positive().max(60_000).default(1_000),
      })
      .strict()
      .prefault({}),
    admin: z
      .object({
        username: z.string().min(1).default("admin"),
        password: z.string().min(12, "admin.password must be at least 12 characters").optional(),
        token: z
          .string()
          .min(32, "admin.token (TESSERA_ADMIN_TOKEN) must be at least 32 characters")
          .optional(),
      })
      .strict()
      .prefault({}),
    auth: z
      .object({
        jwt: z
          .object({
            secret: z
              .string()
              .min(32, "auth.jwt.secret (TESSERA_JWT_SECRET) must be at least 32 characters")
              .optional(),
            algorithm: z.enum(["EdDSA", "ES256"]).default("EdDSA"),
            issuer: z.string().min(1).default("tessera"),
            audience: z.string().min(1).default("tessera"),
            accessTokenTtl: seconds.default(900),
            refreshTokenTtl: seconds.default(30 * 24 * 3600),
            clockSkew: z.number().int().min(0).max(300).default(30),
            keyRotationInterval: seconds.default(30 * 24 * 3600),
            // Unset: DEFAULT_KEY_PRE_PUBLICATION, at most half the rotation interval (see keyPrePublicationSeconds).
            keyPrePublication: z.number().int().min(0).optional(),
            keyRefreshMs: z.number().int().min(10).max(60_000).default(500),
          })
          .strict()
          .superRefine((jwt, ctx) => {
            const pre = jwt.keyPrePublication;
            if (pre === undefined) return;
            if (pre >= jwt.keyRotationInterval)
              ctx.addIssue({
                code: "custom",
                path: ["keyPrePublication"],
                message: `auth.jwt.keyPrePublication (${pre} s) must be shorter than auth.jwt.keyRotationInterval (${jwt.keyRotationInterval} s)`,
              });
            else if (pre > 0 && pre * 1000 < 2 * jwt.keyRefreshMs)
              ctx.addIssue({
                code: "custom",
                path: ["keyPrePublication"],
                message: `auth.jwt.keyPrePublication (${pre} s) must be at least twice auth.jwt.keyRefreshMs (${jwt.keyRefreshMs} ms), so every instance learns a key before it signs`,
              });
          })
          .prefault({}),
        oauth: z
          .object({
            issuer: z
              .string()
              .refine(
                (v) => {
                  try {
                    const u = new URL(v);
                    return (
                      (u.protocol === "https:" || u.protocol === "http:") &&
                      !u.search &&
                      !u.hash &&
                      !u.username
                    );
                  } catch {
                    return false;
                  }
                },
                {
                  message:
                    "auth.oauth.issuer (TESSERA_OAUTH_ISSUER) must be an https URL without query or fragment",
                },
              )
              .optional(),
          })
          .strict()
          .prefault({}),
        basic: z
          .object({ enabled: z.boolean().default(true) })
          .strict()
          .prefault({}),
        tokens: z
          .object({
            patPrefix: z
              .string()
              .regex(/^[a-z0-9_]{2,16}_$/)
              .default("tsr_pat_"),
            apiKeyPrefix: z
              .string()
              .regex(/^[a-z0-9_]{2,16}_$/)
              .default("tsr_key_"),
            machinePrefix: z
              .string()
              .regex(/^[a-z0-9_]{2,16}_$/)
              .default("tsr_mu_"),
            lastUsedFlushSeconds: z.number().int().min(1).max(60).default(15),
            // Unset: the memory bound alone decides (cacheMaxBytes).
            cacheSize: z.number().int().positive().optional(),
            cacheMaxBytes: z
              .number()
              .int()
              .positive()
              .default(64 * 1024 * 1024),
            sharedDigests: z.boolean().default(true),
          })
          .strict()
          .prefault({}),
        passwordIterations: z.number().int().min(1000).default(600_000),
        hashConcurrency: z.number().int().positive().optional(),
        hashQueue: z.number().int().min(0).optional(),
        hashNice: z.number().int().min(0).max(19).default(19),
        hashDeadlineMs: z.number().int().min(0).default(900),
        masterKey: z
          .string()
          .regex(
            /^[A-Za-z0-9+/_-]{43}=?$/,
            "auth.masterKey (TESSERA_MASTER_KEY) must be the base64 of 32 random bytes (openssl rand -base64 32)",
          )
          .optional(),
        masterKeyFile: z.string().min(1).optional(),
        previousMasterKeys: z
          .array(
            z
              .string()
              .regex(
                /^[A-Za-z0-9+/_-]{43}=?$/,
                "auth.previousMasterKeys (TESSERA_PREVIOUS_MASTER_KEYS) must each be the base64 of 32 bytes",
              ),
          )
          .default([]),
        maxTokenTtl: seconds.default(24 * 3600),
        sessionPruneInterval: z.number().int().min(0).default(3600),
      })
      .strict()
      .prefault({}),
    rateLimit: z
      .object({
        enabled: z.boolean().default(true),
        perIpPerMinute: z.number().int().positive().default(600),
        perPrincipalPerMinute: z.number().int().positive().default(1200),
        authFailuresPerIpPerMinute: z.number().int().positive().default(20),
        authFailuresPerUsernamePerHour: z.number().int().positive().default(100),
        authFailuresPerUsernamePerIp: z.number().int().positive().default(5),
        credentialCreationsPerHour: z.number().int().positive().default(60),
        lockoutSeconds: seconds.default(60),
        maxLockoutSeconds: seconds.default(3600),
        redisUrl: z.string().optional(),
        redisTimeoutMs: z.number().int().positive().max(10_000).default(50),
      })
      .strict()
      .prefault({}),
    cors: z
      .object({
        allowedOrigins: z.array(z.string()).default([]),
        maxAge: z.number().int().min(0).default(86400),
      })
      .strict()
      .prefault({}),
    audit: z
      .object({
        bufferSize: z.number().int().positive().default(100_000),
        retentionDays: z.number().int().min(0).default(90),
      })
      .strict()
      .prefault({}),
    log: z
      .object({
        level: z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info"),
        access: z.enum(["info", "debug", "off"]).default("info"),
      })
      .strict()
      .prefault({}),
    metrics: z
      .object({
        // Loopback by default: the metrics name methods, principals' counts and the pool's
        // state, which are for operators, not for the callers of the public port.
        listen: z
          .string()
          .refine((v) => v === "" || v === "off" || parseListen(v) !== null, {
            message: 'expected host:port (e.g. 127.0.0.1:9464, [::1]:9464), or "off"',
          })
          .default("127.0.0.1:9464"),
      })
      .strict()
      .prefault({}),
  })
  .strict();

/**
 * The host and port of a `host:port` listen address (`[v6]:port` for IPv6; port 0 picks a
 * free one), or null when it is not one. "" and "off" mean no listener (checked by callers).
 */
export function parseListen(value: string): { host: string; port: number } | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s]+)):(\d{1,5})$/.exec(value.trim());
  if (!m) return null;
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  if (port > 65535 || (m[1] !== undefined && isIP(host) !== 6)) return null;
  return { host, port };
}

/** The validated configuration. */
export type Config = z.infer<typeof ConfigSchema>;

/** Input shape accepted before defaults are applied (what a YAML file or a test provides). */
export type ConfigInput = z.input<typeof ConfigSchema>;

type EnvKind = "string" | "int" | "bool" | "list";

/** One documented key: where it lives, the variable that overrides it, what it means. */
export interface ConfigKeyReference {
  path: string;
  env: string;
  kind: EnvKind;
  default: string;
  description: string;
}

/** Every configuration key with its environment variable; rendered into docs/configuration.md. */
export const CONFIG_REFERENCE: readonly ConfigKeyReference[] = [
  ["server.host", "TESSERA_HOST", "string", "0.0.0.0", "Address to listen on."],
  [
    "server.port",
    "TESSERA_PORT",
    "int",
    "50052",
    "Port serving gRPC, gRPC-Web and Connect (0 picks a free one).",
  ],
  [
    "server.certDir",
    "TESSERA_CERT_DIR",
    "string",
    "./certs",
    "Folder with ca.crt, server.crt, server.key (and optionally ca.key, ca.crl).",
  ],
  [
    "server.mtls",
    "TESSERA_MTLS",
    "string",
    "optional",
    "Client certificates: off, optional (verified ones identify the caller) or require (handshake fails without one).",
  ],
  [
    "server.insecurePlaintext",
    "TESSERA_INSECURE_PLAINTEXT",
    "bool",
    "false",
    "Serve without TLS (h2c and HTTP/1.1). Development only.",
  ],
  [
    "server.transport",
    "TESSERA_TRANSPORT",
    "string",
    "fast",
    "What serves RPCs on the port: fast (Tessera's own bridge to Node, unary calls answered from the HTTP/2 stream) or connect (connect-node's stock connectNodeAdapter). Both answer every call the same way; fast costs less CPU per call.",
  ],
  [
    "server.devCertificates",
    "TESSERA_DEV_CERTIFICATES",
    "bool",
    "true",
    "Generate a development CA and server certificate when certDir has none.",
  ],
  [
    "server.allowLoopbackHttpCallbacks",
    "TESSERA_ALLOW_LOOPBACK_HTTP_CALLBACKS",
    "bool",
    "false",
    "Accept http:// backend callback URLs to loopback hosts (development).",
  ],
  [
    "server.trustProxy",
    "TESSERA_TRUST_PROXY",
    "bool",
    "false",
    "Shorthand: the direct peer, whatever its address, is a trusted proxy (see server.trustedProxies).",
  ],
  [
    "server.trustedProxies",
    "TESSERA_TRUSTED_PROXIES",
    "list",
    "(none)",
    "Comma-separated addresses or CIDR blocks of trusted proxies. Only from such a peer is the forwarding header (server.forwardedHeader) read: the client IP is the rightmost address in it that is not a trusted proxy.",
  ],
  [
    "server.forwardedHeader",
    "TESSERA_FORWARDED_HEADER",
    "string",
    "x-forwarded-for",
    "The forwarding header trusted proxies write: x-forwarded-for or forwarded (RFC 7239). Only that one is read, never the other as a fallback.",
  ],
  [
    "server.readMaxBytes",
    "TESSERA_READ_MAX_BYTES",
    "int",
    "65536",
    "Largest request message accepted, counted after decompression (decompression stops as soon as it is passed; at most `server.maxBodyBytes`); a larger one is refused with ResourceExhausted.",
  ],
  [
    "server.maxConcurrentStreams",
    "TESSERA_MAX_CONCURRENT_STREAMS",
    "int",
    "256",
    "HTTP/2 streams per connection.",
  ],
  [
    "server.maxHeaderListSize",
    "TESSERA_MAX_HEADER_LIST_SIZE",
    "int",
    "32768",
    "Largest header block accepted.",
  ],
  [
    "server.maxBodyBytes",
    "TESSERA_MAX_BODY_BYTES",
    "int",
    "131072",
    "Largest request body accepted, all messages and envelopes counted (every protocol); a larger one is refused with ResourceExhausted and its stream reset.",
  ],
  [
    "server.idleTimeoutSeconds",
    "TESSERA_IDLE_TIMEOUT_SECONDS",
    "int",
    "60",
    "A connection with no traffic for this long is closed (HTTP/2: GOAWAY first; a call whose client stalls mid-request is cancelled); also the TLS handshake timeout. 0 keeps idle connections.",
  ],
  [
    "server.maxConnections",
    "TESSERA_MAX_CONNECTIONS",
    "int",
    "10000",
    "Open connections in total; more are closed at once, before TLS. 0: no limit.",
  ],
  [
    "server.maxConnectionsPerIp",
    "TESSERA_MAX_CONNECTIONS_PER_IP",
    "int",
    "1024",
    "Open connections per peer address (an IPv6 peer's whole /64; the proxy's, behind one); more are closed at once, before TLS. 0: no limit.",
  ],
  [
    "server.requestTimeoutSeconds",
    "TESSERA_REQUEST_TIMEOUT_SECONDS",
    "int",
    "10",
    "Time a client has to send a request's headers and body, however slowly it trickles them: past it the call is cancelled (HTTP/2 RST_STREAM CANCEL; HTTP/1.1: the connection is closed). Also bounds the client's half of a client or bidi stream (reflection). 0: no limit.",
  ],
  [
    "server.maxStreamSeconds",
    "TESSERA_MAX_STREAM_SECONDS",
    "int",
    "3600",
    "Longest life of a streaming call (e.g. grpc.health.v1.Health/Watch): Watch then ends with OK, and any other stream still open is cancelled; clients reconnect. 0: no limit.",
  ],
  [
    "server.maxStreamsPerIp",
    "TESSERA_MAX_STREAMS_PER_IP",
    "int",
    "64",
    "Streaming calls open at once per client address (an IPv6 client's whole /64), over all its connections; more are refused with ResourceExhausted. 0: no limit.",
  ],
  [
    "server.shutdownGraceSeconds",
    "TESSERA_SHUTDOWN_GRACE_SECONDS",
    "int",
    "10",
    "On SIGTERM or SIGINT: seconds in-flight calls get to finish once the port is closed and HTTP/2 clients have been sent GOAWAY; connections still open after it are cut, then audit events and last-used times are flushed and the database closed.",
  ],
  [
    "server.drainDelaySeconds",
    "TESSERA_DRAIN_DELAY_SECONDS",
    "int",
    "0",
    "On SIGTERM or SIGINT, /ready answers 503 at once; for these seconds everything else is still served, new connections included, before the port closes and server.shutdownGraceSeconds begins. Behind a load balancer or Kubernetes, set it to the time they take to stop routing to an instance whose /ready fails (probe period × failure threshold, a few seconds). 0: the port closes at once.",
  ],
  [
    "database.url",
    "TESSERA_DATABASE_URL",
    "string",
    "sqlite:./data/tessera.db",
    "sqlite:<file> (or sqlite::memory:) for the embedded database; postgres://… selects PostgreSQL.",
  ],
  ["database.debug", "TESSERA_DATABASE_DEBUG", "bool", "false", "Log SQL (never parameters)."],
  [
    "database.stateCacheSize",
    "TESSERA_STATE_CACHE_SIZE",
    "int",
    "10000",
    "Subjects (users, tokens, machine users) whose authentication state is kept in memory per statement, emptied by any change to it (SQLite: triggers and data_version; PostgreSQL: LISTEN/NOTIFY, off while the listening session is down); 0 reads it per request.",
  ],
  [
    "database.statementTimeoutMs",
    "TESSERA_DATABASE_STATEMENT_TIMEOUT_MS",
    "int",
    "5000",
    "PostgreSQL: longest a statement may run (the server's statement_timeout); a database that does not answer at all is given up on by the client 1 s after it. Either way the call is answered Unavailable (503, Retry-After). Migrations and the start-up lock's wait are exempt. 0: no bound.",
  ],
  [
    "database.connectTimeoutMs",
    "TESSERA_DATABASE_CONNECT_TIMEOUT_MS",
    "int",
    "5000",
    "PostgreSQL: longest wait for a new connection (TCP and start-up) and for a free pooled connection; past it the call is answered Unavailable.",
  ],
  [
    "database.barrierTimeoutMs",
    "TESSERA_STATE_BARRIER_TIMEOUT_MS",
    "int",
    "1000",
    "PostgreSQL: how long a write to authentication state waits for every instance to acknowledge it emptied its state cache; past it the silent instances' listening sessions are ended, which turns their caches off.",
  ],
  ["admin.username", "TESSERA_ADMIN_USERNAME", "string", "admin", "Username of the bootstrap admin."],
  [
    "admin.password",
    "TESSERA_ADMIN_PASSWORD",
    "string",
    "(generated, printed once)",
    "Password of the bootstrap admin when it is first created.",
  ],
  [
    "admin.token",
    "TESSERA_ADMIN_TOKEN",
    "string",
    "(unset)",
    "Static superuser bearer token, at least 32 characters; compared as SHA-256 in constant time.",
  ],
  [
    "auth.jwt.secret",
    "TESSERA_JWT_SECRET",
    "string",
    "(unset)",
    "HS256 signing secret (at least 32 characters). Unset: asymmetric keys generated and served at /.well-known/jwks.json.",
  ],
  [
    "auth.jwt.algorithm",
    "TESSERA_JWT_ALGORITHM",
    "string",
    "EdDSA",
    "Asymmetric algorithm when no secret is set: EdDSA or ES256.",
  ],
  [
    "auth.jwt.issuer",
    "TESSERA_JWT_ISSUER",
    "string",
    "tessera",
    "iss claim of issued tokens, checked on verification.",
  ],
  [
    "auth.jwt.audience",
    "TESSERA_JWT_AUDIENCE",
    "string",
    "tessera",
    "aud claim of issued tokens, checked on verification.",
  ],
  [
    "auth.oauth.issuer",
    "TESSERA_OAUTH_ISSUER",
    "string",
    "(the request's https://host)",
    "OAuth 2.0 issuer identifier (RFC 8414): the https URL clients reach this server at, e.g. https://tessera.example.com:50052. The discovery document (/.well-known/oauth-authorization-server) names it and builds the token, revocation and introspection endpoints and jwks_uri from it. Unset: taken from each request's Host (fine for one address; set it behind a proxy or load balancer).",
  ],
  ["auth.jwt.accessTokenTtl", "TESSERA_ACCESS_TOKEN_TTL", "int", "900", "Access token lifetime in seconds."],
  [
    "auth.jwt.refreshTokenTtl",
    "TESSERA_REFRESH_TOKEN_TTL",
    "int",
    "2592000",
    "Refresh token lifetime in seconds.",
  ],
  [
    "auth.jwt.clockSkew",
    "TESSERA_JWT_CLOCK_SKEW",
    "int",
    "30",
    "Tolerated clock skew in seconds for nbf/iat of access tokens (a token minted by an instance whose clock runs ahead is not refused as not yet valid). Never added to an expiry Tessera set: exp, grace periods and token lifetimes end exactly.",
  ],
  [
    "auth.jwt.keyRotationInterval",
    "TESSERA_JWT_KEY_ROTATION_INTERVAL",
    "int",
    "2592000",
    "Seconds each signing key signs before the next one takes over, checked while running (by exactly one instance of a fleet); retired keys stay published and verify until every token they signed has expired.",
  ],
  [
    "auth.jwt.keyPrePublication",
    "TESSERA_JWT_KEY_PRE_PUBLICATION",
    "int",
    "3600 (at most half of auth.jwt.keyRotationInterval)",
    "Seconds a new signing key is published in the JWKS of every instance before it signs anything (longer than relying parties cache the JWKS); 0 activates it at once.",
  ],
  [
    "auth.jwt.keyRefreshMs",
    "TESSERA_JWT_KEY_REFRESH_MS",
    "int",
    "500",
    "How often (ms) each instance re-reads the signing keys from the database (one small query): the bound on how long a key another instance created stays unknown here.",
  ],
  ["auth.basic.enabled", "TESSERA_BASIC_AUTH", "bool", "true", "Accept Authorization: Basic for users."],
  ["auth.tokens.patPrefix", "TESSERA_PAT_PREFIX", "string", "tsr_pat_", "Prefix of personal access tokens."],
  ["auth.tokens.apiKeyPrefix", "TESSERA_API_KEY_PREFIX", "string", "tsr_key_", "Prefix of API keys."],
  [
    "auth.tokens.machinePrefix",
    "TESSERA_MACHINE_TOKEN_PREFIX",
    "string",
    "tsr_mu_",
    "Prefix of machine-user bearer tokens.",
  ],
  [
    "auth.tokens.lastUsedFlushSeconds",
    "TESSERA_LAST_USED_FLUSH_SECONDS",
    "int",
    "15",
    "How often last-used times are written (at most 60).",
  ],
  [
    "auth.tokens.cacheMaxBytes",
    "TESSERA_TOKEN_CACHE_MAX_BYTES",
    "int",
    "67108864 (64 MiB)",
    "Heap bytes of the in-process cache of verified secrets (tokens, API keys, machine credentials, Basic passwords) that spares PBKDF2 on re-use: an entry is counted as 160 bytes (131–155 measured), so 64 MiB hold about 420,000 credentials and 1,000,000 need about 153 MiB. Least recently used entries go first.",
  ],
  [
    "auth.tokens.cacheSize",
    "TESSERA_TOKEN_CACHE_SIZE",
    "int",
    "(unset)",
    "At most this many entries in that cache as well; unset, auth.tokens.cacheMaxBytes alone bounds it.",
  ],
  [
    "auth.tokens.sharedDigests",
    "TESSERA_TOKEN_SHARED_DIGESTS",
    "bool",
    "true",
    "After PBKDF2 verified a token's or machine credential's secret, store HMAC(key derived from the master key, credential, hash, secret) beside its row, so every instance (and this one after a restart or an eviction) recognises it with one HMAC instead of PBKDF2. A dump of the database cannot test guesses without the master key. Never done for human passwords.",
  ],
  [
    "auth.passwordIterations",
    "TESSERA_PASSWORD_ITERATIONS",
    "int",
    "600000",
    "PBKDF2-SHA256 iterations for new hashes (OWASP 2023: 600000).",
  ],
  [
    "auth.hashConcurrency",
    "TESSERA_HASH_CONCURRENCY",
    "int",
    "(cores − 1, at least 1)",
    "PBKDF2 hashes computed at once (password checks, new secrets); the rest of the cores are left to serving requests.",
  ],
  [
    "auth.hashQueue",
    "TESSERA_HASH_QUEUE",
    "int",
    "(4 × hashConcurrency)",
    "PBKDF2 hashes waiting for a slot; past it a password check is refused at once with Unavailable and Retry-After.",
  ],
  [
    "auth.hashNice",
    "TESSERA_HASH_NICE",
    "int",
    "19",
    "Nice value (0–19) the PBKDF2 threads give themselves (Linux): at 19 hashing only gets CPU that serving requests leaves, so a flood of wrong passwords cannot starve authenticated calls. 0 hashes at the event loop's priority.",
  ],
  [
    "auth.hashDeadlineMs",
    "TESSERA_HASH_DEADLINE_MS",
    "int",
    "900",
    "Milliseconds a password check may wait for its verdict (queue and hash); past it Unavailable with Retry-After. 0: no limit. Hashing a new secret is never cut short.",
  ],
  [
    "auth.masterKey",
    "TESSERA_MASTER_KEY",
    "string",
    "(unset)",
    "Base64 of 32 random bytes: the key-encryption key sealing private signing keys in the database (AES-256-GCM). Unset with SQLite: <database folder>/master.key, generated 0600 on first start. Required with PostgreSQL (or masterKeyFile).",
  ],
  [
    "auth.masterKeyFile",
    "TESSERA_MASTER_KEY_FILE",
    "string",
    "(unset)",
    "File holding the master key (base64 of 32 bytes), instead of auth.masterKey.",
  ],
  [
    "auth.previousMasterKeys",
    "TESSERA_PREVIOUS_MASTER_KEYS",
    "list",
    "(none)",
    "Comma-separated master keys being rotated out: signing keys sealed with one are resealed under the current master key at start. Drop them once every instance runs with the new key.",
  ],
  [
    "auth.maxTokenTtl",
    "TESSERA_MAX_TOKEN_TTL",
    "int",
    "86400",
    "Cap in seconds on the lifetime of every access JWT minted (configured lifetime, machine tokens, rotation grace periods). PATs and API keys are checked on every use and revocable at once, so their expires_at is not capped.",
  ],
  [
    "auth.sessionPruneInterval",
    "TESSERA_SESSION_PRUNE_INTERVAL",
    "int",
    "3600",
    "Seconds between prunings of ended sessions: a session revoked, or whose last refresh token expired, longer ago than the refresh-token lifetime (and never less than auth.maxTokenTtl + auth.jwt.clockSkew, so none of its access tokens can still verify) is deleted with its refresh tokens, in batches. 0: never.",
  ],
  ["rateLimit.enabled", "TESSERA_RATE_LIMIT", "bool", "true", "Enforce rate limits."],
  [
    "rateLimit.perIpPerMinute",
    "TESSERA_RATE_LIMIT_PER_IP",
    "int",
    "600",
    "Requests per minute per client IP.",
  ],
  [
    "rateLimit.perPrincipalPerMinute",
    "TESSERA_RATE_LIMIT_PER_PRINCIPAL",
    "int",
    "1200",
    "Requests per minute per authenticated principal.",
  ],
  [
    "rateLimit.authFailuresPerIpPerMinute",
    "TESSERA_RATE_LIMIT_AUTH_FAILURES",
    "int",
    "20",
    "Failed logins/credentials per minute per IP before refusing. Budget is reserved before a password is verified and refunded on success.",
  ],
  [
    "rateLimit.authFailuresPerUsernamePerHour",
    "TESSERA_RATE_LIMIT_AUTH_FAILURES_PER_USERNAME",
    "int",
    "100",
    "Failed password checks per hour for one username, from all addresses together, before the username is refused until the hour ends.",
  ],
  [
    "rateLimit.authFailuresPerUsernamePerIp",
    "TESSERA_RATE_LIMIT_AUTH_FAILURES_PER_USERNAME_IP",
    "int",
    "5",
    "Consecutive failed password checks for one username from one IP, within an hour, before that IP is locked out of that username.",
  ],
  [
    "rateLimit.credentialCreationsPerHour",
    "TESSERA_RATE_LIMIT_CREDENTIAL_CREATIONS",
    "int",
    "60",
    "Personal access tokens, API keys and machine-user credentials (creation and rotation) one principal may create per hour; each costs a PBKDF2.",
  ],
  [
    "rateLimit.lockoutSeconds",
    "TESSERA_RATE_LIMIT_LOCKOUT_SECONDS",
    "int",
    "60",
    "First lockout of an IP from a username; each further lockout within a day doubles it.",
  ],
  [
    "rateLimit.maxLockoutSeconds",
    "TESSERA_RATE_LIMIT_MAX_LOCKOUT_SECONDS",
    "int",
    "3600",
    "Longest lockout of an IP from a username.",
  ],
  [
    "rateLimit.redisUrl",
    "TESSERA_REDIS_URL",
    "string",
    "(unset)",
    "redis://… to share rate limits between instances.",
  ],
  [
    "rateLimit.redisTimeoutMs",
    "TESSERA_REDIS_TIMEOUT_MS",
    "int",
    "50",
    "Deadline in milliseconds of every Redis call; past it (or with Redis down) limits fall back to per-instance counting, and Redis is tried again at most once a second.",
  ],
  [
    "cors.allowedOrigins",
    "TESSERA_CORS_ALLOWED_ORIGINS",
    "list",
    "(none)",
    "Comma-separated origins allowed by CORS; * for any (development only).",
  ],
  ["cors.maxAge", "TESSERA_CORS_MAX_AGE", "int", "86400", "Access-Control-Max-Age in seconds."],
  [
    "audit.bufferSize",
    "TESSERA_AUDIT_BUFFER_SIZE",
    "int",
    "100000",
    "Audit events (and, apart, credentials' last-used times) kept in memory while they wait to be written, e.g. through a database outage (retried with backoff). Past it new events are dropped, counted and logged once per overflow.",
  ],
  [
    "audit.retentionDays",
    "TESSERA_AUDIT_RETENTION_DAYS",
    "int",
    "90",
    "Days audit events are kept; older ones are deleted in batches every hour. 0 keeps them forever.",
  ],
  [
    "log.level",
    "TESSERA_LOG_LEVEL",
    "string",
    "info",
    "fatal, error, warn, info, debug, trace or silent. Re-read on SIGHUP (config file and environment), so a running server changes level without a restart.",
  ],
  [
    "log.access",
    "TESSERA_LOG_ACCESS",
    "string",
    "info",
    "Access log: one line per RPC (method, protocol, code, reason, duration, principal, request id, client IP; never a credential) at info or debug level, or off.",
  ],
  [
    "metrics.listen",
    "TESSERA_METRICS_LISTEN",
    "string",
    "127.0.0.1:9464",
    "host:port of the Prometheus endpoint GET /metrics (plain HTTP, apart from the public port; see docs/metrics.md); off for none. Reachable from loopback only by default.",
  ],
].map(([path, env, kind, def, description]) => ({
  path: path as string,
  env: env as string,
  kind: kind as EnvKind,
  default: def as string,
  description: description as string,
}));

/** Thrown when the configuration is invalid; the message lists every problem. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

function parseEnvValue(ref: ConfigKeyReference, raw: string): unknown {
  switch (ref.kind) {
    case "string":
      return raw;
    case "int": {
      if (!/^-?\d+$/.test(raw.trim())) throw new ConfigError(`${ref.env}: expected an integer, got "${raw}"`);
      return Number.parseInt(raw, 10);
    }
    case "bool": {
      const v = raw.trim().toLowerCase();
      if (["1", "true", "yes", "on"].includes(v)) return true;
      if (["0", "false", "no", "off"].includes(v)) return false;
      throw new ConfigError(`${ref.env}: expected true or false, got "${raw}"`);
    }
    case "list":
      return raw
        .split(",")
        .map((s) => s.trim())
        .filter((s) => s.length > 0);
  }
}

function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split(".");
  let node = target;
  for (const part of parts.slice(0, -1)) {
    const next = node[part];
    if (next === undefined || next === null || typeof next !== "object") node[part] = {};
    node = node[part] as Record<string, unknown>;
  }
  node[parts[parts.length - 1]!] = value;
}

/** Options for {@link loadConfig}. */
export interface LoadConfigOptions {
  /** YAML file; defaults to TESSERA_CONFIG when set. */
  file?: string;
  /** Environment to read overrides from; defaults to process.env. */
  env?: NodeJS.ProcessEnv;
  /** Values applied on top of file and environment (CLI flags, tests). */
  overrides?: ConfigInput;
}

function deepMerge(base: Record<string, unknown>, extra: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(extra)) {
    const cur = out[k];
    if (
      v &&
      typeof v === "object" &&
      !Array.isArray(v) &&
      cur &&
      typeof cur === "object" &&
      !Array.isArray(cur)
    ) {
      out[k] = deepMerge(cur as Record<string, unknown>, v as Record<string, unknown>);
    } else if (v !== undefined) {
      out[k] = v;
    }
  }
  return out;
}

/**
 * Load, merge and validate the configuration: file, then environment, then overrides.
 * @throws ConfigError listing every invalid key with the variable that sets it.
 */
export function loadConfig(options: LoadConfigOptions = {}): Config {
  const env = options.env ?? process.env;
  const file = options.file ?? env.TESSERA_CONFIG;
  let raw: Record<string, unknown> = {};
  if (file) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      throw new ConfigError(`cannot read config file ${file}: ${(err as Error).message}`);
    }
    const parsed: unknown = parseYaml(text);
    if (parsed !== null && parsed !== undefined) {
      if (typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new ConfigError(`config file ${file}: expected a mapping at the top level`);
      }
      raw = parsed as Record<string, unknown>;
    }
  }
  for (const ref of CONFIG_REFERENCE) {
    const value = env[ref.env];
    if (value !== undefined && value !== "") setPath(raw, ref.path, parseEnvValue(ref, value));
  }
  if (options.overrides) raw = deepMerge(raw, options.overrides as Record<string, unknown>);
  const result = ConfigSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => {
      const path = issue.path.join(".");
      const ref = CONFIG_REFERENCE.find((r) => r.path === path);
      const keys = issue.code === "unrecognized_keys" ? ` (${issue.keys.join(", ")})` : "";
      return `  ${path || "(root)"}${ref ? ` [${ref.env}]` : ""}: ${issue.message}${keys}`;
    });
    throw new ConfigError(`invalid configuration${file ? ` (${file})` : ""}:\n${lines.join("\n")}`);
  }
  return result.data;
}
