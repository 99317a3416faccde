import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it, vi } from "vitest";
import { z } from "zod";
import { renderConfigDoc } from "../scripts/gen-config-doc.js";
import { configKeys, referenceOf } from "../src/config/key-docs.js";
import { CONFIG_REFERENCE, type Config, ConfigError, loadConfig } from "../src/config.js";

/**
 * The public contract, pinned: every key, the variable that overrides it and the default the
 * reference shows. The reference is generated from the schema, so a key renamed, a variable
 * renamed or a default changed there fails here and has to be changed on purpose.
 */
const CONTRACT = [
  "server.host TESSERA_HOST 0.0.0.0",
  "server.port TESSERA_PORT 50052",
  "server.certDir TESSERA_CERT_DIR ./certs",
  "server.mtls TESSERA_MTLS optional",
  "server.insecurePlaintext TESSERA_INSECURE_PLAINTEXT false",
  "server.transport TESSERA_TRANSPORT fast",
  "server.devCertificates TESSERA_DEV_CERTIFICATES true",
  "server.allowLoopbackHttpCallbacks TESSERA_ALLOW_LOOPBACK_HTTP_CALLBACKS false",
  "server.trustProxy TESSERA_TRUST_PROXY false",
  "server.trustedProxies TESSERA_TRUSTED_PROXIES (none)",
  "server.forwardedHeader TESSERA_FORWARDED_HEADER x-forwarded-for",
  "server.readMaxBytes TESSERA_READ_MAX_BYTES 65536",
  "server.maxConcurrentStreams TESSERA_MAX_CONCURRENT_STREAMS 256",
  "server.maxHeaderListSize TESSERA_MAX_HEADER_LIST_SIZE 32768",
  "server.maxBodyBytes TESSERA_MAX_BODY_BYTES 131072",
  "server.idleTimeoutSeconds TESSERA_IDLE_TIMEOUT_SECONDS 60",
  "server.maxConnectionAgeSeconds TESSERA_MAX_CONNECTION_AGE_SECONDS 0",
  "server.maxConnectionAgeGraceSeconds TESSERA_MAX_CONNECTION_AGE_GRACE_SECONDS 60",
  "server.maxConnections TESSERA_MAX_CONNECTIONS 10000",
  "server.maxConnectionsPerIp TESSERA_MAX_CONNECTIONS_PER_IP 1024",
  "server.newConnectionsPerIpPerSecond TESSERA_NEW_CONNECTIONS_PER_IP_PER_SECOND 200",
  "server.maxOpenStreamsPerIp TESSERA_MAX_OPEN_STREAMS_PER_IP 16384",
  "server.requestTimeoutSeconds TESSERA_REQUEST_TIMEOUT_SECONDS 10",
  "server.maxStreamSeconds TESSERA_MAX_STREAM_SECONDS 3600",
  "server.maxStreamsPerIp TESSERA_MAX_STREAMS_PER_IP 64",
  "server.maxStreamMessages TESSERA_MAX_STREAM_MESSAGES 100",
  "server.shutdownGraceSeconds TESSERA_SHUTDOWN_GRACE_SECONDS 10",
  "server.drainDelaySeconds TESSERA_DRAIN_DELAY_SECONDS 0",
  "database.url TESSERA_DATABASE_URL sqlite:./data/tessera.db",
  "database.debug TESSERA_DATABASE_DEBUG false",
  "database.stateCacheSize TESSERA_STATE_CACHE_SIZE 10000",
  "database.statementTimeoutMs TESSERA_DATABASE_STATEMENT_TIMEOUT_MS 5000",
  "database.connectTimeoutMs TESSERA_DATABASE_CONNECT_TIMEOUT_MS 5000",
  "database.barrierTimeoutMs TESSERA_STATE_BARRIER_TIMEOUT_MS 1000",
  "admin.username TESSERA_ADMIN_USERNAME admin",
  "admin.password TESSERA_ADMIN_PASSWORD (generated, printed once)",
  "admin.token TESSERA_ADMIN_TOKEN (unset)",
  "auth.jwt.secret TESSERA_JWT_SECRET (unset)",
  "auth.jwt.algorithm TESSERA_JWT_ALGORITHM EdDSA",
  "auth.jwt.issuer TESSERA_JWT_ISSUER tessera",
  "auth.jwt.audience TESSERA_JWT_AUDIENCE tessera",
  "auth.jwt.accessTokenTtl TESSERA_ACCESS_TOKEN_TTL 900",
  "auth.jwt.refreshTokenTtl TESSERA_REFRESH_TOKEN_TTL 2592000",
  "auth.jwt.clockSkew TESSERA_JWT_CLOCK_SKEW 30",
  "auth.jwt.keyRotationInterval TESSERA_JWT_KEY_ROTATION_INTERVAL 2592000",
  "auth.jwt.keyPrePublication TESSERA_JWT_KEY_PRE_PUBLICATION 3600 (at most half of auth.jwt.keyRotationInterval)",
  "auth.jwt.keyRefreshMs TESSERA_JWT_KEY_REFRESH_MS 500",
  "auth.oauth.issuer TESSERA_OAUTH_ISSUER (the request's https://host)",
  "auth.basic.enabled TESSERA_BASIC_AUTH true",
  "auth.tokens.patPrefix TESSERA_PAT_PREFIX tsr_pat_",
  "auth.tokens.apiKeyPrefix TESSERA_API_KEY_PREFIX tsr_key_",
  "auth.tokens.machinePrefix TESSERA_MACHINE_TOKEN_PREFIX tsr_mu_",
  "auth.tokens.lastUsedFlushSeconds TESSERA_LAST_USED_FLUSH_SECONDS 15",
  "auth.tokens.cacheMaxBytes TESSERA_TOKEN_CACHE_MAX_BYTES 67108864 (64 MiB)",
  "auth.tokens.cacheSize TESSERA_TOKEN_CACHE_SIZE (unset)",
  "auth.tokens.sharedDigests TESSERA_TOKEN_SHARED_DIGESTS true",
  "auth.passwordIterations TESSERA_PASSWORD_ITERATIONS 600000",
  "auth.hashConcurrency TESSERA_HASH_CONCURRENCY (cores − 1, at least 1)",
  "auth.hashQueue TESSERA_HASH_QUEUE (4 × hashConcurrency)",
  "auth.hashNice TESSERA_HASH_NICE 19",
  "auth.hashIdle TESSERA_HASH_IDLE true",
  "auth.hashDeadlineMs TESSERA_HASH_DEADLINE_MS 900",
  "auth.masterKey TESSERA_MASTER_KEY (unset)",
  "auth.masterKeyFile TESSERA_MASTER_KEY_FILE (unset)",
  "auth.previousMasterKeys TESSERA_PREVIOUS_MASTER_KEYS (none)",
  "auth.maxTokenTtl TESSERA_MAX_TOKEN_TTL 86400",
  "auth.sessionMaxLifetime TESSERA_SESSION_MAX_LIFETIME 2592000",
  "auth.sessionPruneInterval TESSERA_SESSION_PRUNE_INTERVAL 3600",
  "rateLimit.enabled TESSERA_RATE_LIMIT true",
  "rateLimit.perIpPerMinute TESSERA_RATE_LIMIT_PER_IP 600",
  "rateLimit.perPrincipalPerMinute TESSERA_RATE_LIMIT_PER_PRINCIPAL 1200",
  "rateLimit.authFailuresPerIpPerMinute TESSERA_RATE_LIMIT_AUTH_FAILURES 20",
  "rateLimit.verifyFailuresPerCallerPerMinute TESSERA_RATE_LIMIT_VERIFY_FAILURES_PER_CALLER 600",
  "rateLimit.authFailuresPerUsernamePerHour TESSERA_RATE_LIMIT_AUTH_FAILURES_PER_USERNAME 100",
  "rateLimit.authFailuresPerUsernamePerIp TESSERA_RATE_LIMIT_AUTH_FAILURES_PER_USERNAME_IP 5",
  "rateLimit.passwordChecksPerUsernamePerMinute TESSERA_RATE_LIMIT_PASSWORD_CHECKS_PER_USERNAME 10",
  "rateLimit.credentialCreationsPerHour TESSERA_RATE_LIMIT_CREDENTIAL_CREATIONS 60",
  "rateLimit.lockoutSeconds TESSERA_RATE_LIMIT_LOCKOUT_SECONDS 60",
  "rateLimit.maxLockoutSeconds TESSERA_RATE_LIMIT_MAX_LOCKOUT_SECONDS 3600",
  "rateLimit.redisUrl TESSERA_REDIS_URL (unset)",
  "rateLimit.redisTimeoutMs TESSERA_REDIS_TIMEOUT_MS 50",
  "cors.allowedOrigins TESSERA_CORS_ALLOWED_ORIGINS (none)",
  "cors.maxAge TESSERA_CORS_MAX_AGE 86400",
  "audit.bufferSize TESSERA_AUDIT_BUFFER_SIZE 100000",
  "audit.retentionDays TESSERA_AUDIT_RETENTION_DAYS 90",
  "log.level TESSERA_LOG_LEVEL info",
  "log.access TESSERA_LOG_ACCESS info",
  "metrics.listen TESSERA_METRICS_LISTEN 127.0.0.1:9464",
  "verification.watchHeartbeatSeconds TESSERA_WATCH_HEARTBEAT_SECONDS 10",
  "verification.watchPollMs TESSERA_WATCH_POLL_MS 250",
  "verification.watchMaxStreamsPerCaller TESSERA_WATCH_MAX_STREAMS_PER_CALLER 8",
  "verification.watchMaxStreams TESSERA_WATCH_MAX_STREAMS 1000",
  "verification.revocationRetentionSeconds TESSERA_REVOCATION_RETENTION_SECONDS 86400",
  "verification.revocationMaxEvents TESSERA_REVOCATION_MAX_EVENTS 1000000",
];

/** The keys whose default is computed at start or generated, so the reference words it. */
const DEFAULT_IN_WORDS = new Set([
  "admin.password",
  "auth.jwt.keyPrePublication",
  "auth.oauth.issuer",
  "auth.tokens.cacheMaxBytes",
  "auth.hashConcurrency",
  "auth.hashQueue",
]);

/** The value at a dotted path of the loaded configuration. */
function at(config: Config, path: string): unknown {
  return path.split(".").reduce<unknown>((node, part) => (node as Record<string, unknown>)[part], config);
}

/** Every dotted path of a plain object's non-object leaves. */
function leafPaths(node: Record<string, unknown>, prefix = ""): string[] {
  return Object.entries(node).flatMap(([k, v]) =>
    v !== null && typeof v === "object" && !Array.isArray(v)
      ? leafPaths(v as Record<string, unknown>, `${prefix}${k}.`)
      : [`${prefix}${k}`],
  );
}

describe("configuration", () => {
  it("has safe defaults matching the documented environment names", () => {
    const c = loadConfig({ env: {} });
    expect(c.server.host).toBe("0.0.0.0");
    expect(c.server.port).toBe(50052);
    expect(c.server.certDir).toBe("./certs");
    expect(c.server.mtls).toBe("optional");
    expect(c.server.insecurePlaintext).toBe(false);
    expect(c.database.url).toMatch(/^sqlite:\.\/data\//);
    expect(c.admin.username).toBe("admin");
    expect(c.auth.passwordIterations).toBe(600_000);
    expect(c.auth.jwt.secret).toBeUndefined();
  });

  it("applies environment overrides", () => {
    const c = loadConfig({
      env: {
        TESSERA_HOST: "127.0.0.1",
        TESSERA_PORT: "6000",
        TESSERA_DATABASE_URL: "postgres://x@localhost/db",
        TESSERA_CERT_DIR: "/etc/tessera",
        TESSERA_MTLS: "require",
        TESSERA_ADMIN_USERNAME: "root",
        TESSERA_ADMIN_PASSWORD: "a-long-admin-password",
        TESSERA_JWT_SECRET: "x".repeat(32),
        TESSERA_LOG_LEVEL: "debug",
        TESSERA_CORS_ALLOWED_ORIGINS: "https://a.example, https://b.example",
      },
    });
    expect(c.server.host).toBe("127.0.0.1");
    expect(c.server.port).toBe(6000);
    expect(c.database.url).toBe("postgres://x@localhost/db");
    expect(c.server.certDir).toBe("/etc/tessera");
    expect(c.server.mtls).toBe("require");
    expect(c.admin.username).toBe("root");
    expect(c.auth.jwt.secret).toHaveLength(32);
    expect(c.log.level).toBe("debug");
    expect(c.cors.allowedOrigins).toEqual(["https://a.example", "https://b.example"]);
  });

  it("reads a YAML file and lets the environment win over it", () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-config-"));
    const file = join(dir, "tessera.yaml");
    writeFileSync(file, "server:\n  port: 7000\n  mtls: off\nlog:\n  level: warn\n");
    const c = loadConfig({ file, env: { TESSERA_PORT: "7001" } });
    expect(c.server.port).toBe(7001);
    expect(c.server.mtls).toBe("off");
    expect(c.log.level).toBe("warn");
  });

  it("rejects unknown keys, naming them", () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-config-"));
    const file = join(dir, "bad.yaml");
    writeFileSync(file, "server:\n  prot: 7000\n");
    expect(() => loadConfig({ file, env: {} })).toThrow(/prot/);
  });

  it("refuses a config file that is not valid YAML without quoting it, nor warning with its lines", () => {
    // The YAML parser's errors and warnings quote the offending line, here a secret: printed at
    // start-up and logged by a SIGHUP reload (the service log).
    const dir = mkdtempSync(join(tmpdir(), "tessera-config-"));
    const secret = "TopSecretAdminPw123";
    const warnings = vi.spyOn(process, "emitWarning").mockImplementation(() => undefined);
    try {
      for (const text of [
        `admin:\n  password: ${secret}: x\n`,
        `admin:\n  password: "${secret}\ndatabase:\n  url: postgres://u:${secret}@db/x\n`,
        `auth:\n  masterKey: "${secret}"x\n`,
      ]) {
        const file = join(dir, "broken.yaml");
        writeFileSync(file, text);
        let message = "";
        try {
          loadConfig({ file, env: {} });
        } catch (e) {
          expect(e).toBeInstanceOf(ConfigError);
          message = (e as Error).message;
        }
        expect(message).toMatch(/not valid YAML \(line \d+, column \d+\)/);
        expect(message).not.toContain(secret);
      }
      // A tag the parser does not know is a warning, not an error: read as the plain string,
      // and never said through process.emitWarning (stderr) with the line.
      const file = join(dir, "tagged.yaml");
      writeFileSync(file, `admin:\n  password: !weird ${secret}\n`);
      expect(loadConfig({ file, env: {} }).admin.password).toBe(secret);
      expect(warnings.mock.calls.map((c) => String(c[0]))).toEqual([]);
    } finally {
      warnings.mockRestore();
    }
  });

  it("rejects bad values with the variable that sets them", () => {
    expect(() => loadConfig({ env: { TESSERA_MTLS: "sometimes" } })).toThrow(/TESSERA_MTLS/);
    expect(() => loadConfig({ env: { TESSERA_PORT: "http" } })).toThrow(ConfigError);
    expect(() => loadConfig({ env: { TESSERA_JWT_SECRET: "short" } })).toThrow(/at least 32/);
    expect(() => loadConfig({ env: { TESSERA_ADMIN_TOKEN: "short" } })).toThrow(/TESSERA_ADMIN_TOKEN/);
  });

  it("refuses durations past setTimeout's longest delay, which Node would fire after 1 ms", () => {
    // 30 days: every connection recycled, closed as idle or cancelled at once instead of never.
    for (const name of [
      "TESSERA_IDLE_TIMEOUT_SECONDS",
      "TESSERA_REQUEST_TIMEOUT_SECONDS",
      "TESSERA_MAX_STREAM_SECONDS",
      "TESSERA_MAX_CONNECTION_AGE_SECONDS",
      "TESSERA_MAX_CONNECTION_AGE_GRACE_SECONDS",
    ]) {
      expect(() => loadConfig({ env: { [name]: "2592000" } }), name).toThrow(new RegExp(name));
      expect(loadConfig({ env: { [name]: "2147482" } }), name).toBeDefined();
    }
    expect(() => loadConfig({ env: { TESSERA_HASH_DEADLINE_MS: "2592000000" } })).toThrow(
      /TESSERA_HASH_DEADLINE_MS/,
    );
    // Lifetimes past 100 years: a token's expiry beyond a Date's range made every Login Internal.
    for (const name of [
      "TESSERA_SESSION_MAX_LIFETIME",
      "TESSERA_ACCESS_TOKEN_TTL",
      "TESSERA_REFRESH_TOKEN_TTL",
      "TESSERA_MAX_TOKEN_TTL",
    ]) {
      expect(() => loadConfig({ env: { [name]: "9000000000000" } }), name).toThrow(new RegExp(name));
      expect(loadConfig({ env: { [name]: "3153600000" } }), name).toBeDefined();
    }
  });

  it("refuses token prefixes that would take another kind's tokens", () => {
    // POST /oauth2/revoke read such PATs as refresh tokens and revoked nothing.
    expect(() => loadConfig({ env: { TESSERA_PAT_PREFIX: "tsr_rt_" } })).toThrow(/refresh tokens' prefix/);
    expect(() => loadConfig({ env: { TESSERA_API_KEY_PREFIX: "tsr_rt_key_" } })).toThrow(
      /auth\.tokens\.apiKeyPrefix .*refresh tokens' prefix/,
    );
    expect(() => loadConfig({ env: { TESSERA_MACHINE_TOKEN_PREFIX: "tsr_pat_" } })).toThrow(
      /auth\.tokens\.machinePrefix must differ from auth\.tokens\.patPrefix/,
    );
    // Nested prefixes stay allowed: the longest one a token starts with decides (auth/token-format.ts).
    expect(loadConfig({ env: { TESSERA_API_KEY_PREFIX: "tsr_pat_key_" } }).auth.tokens.apiKeyPrefix).toBe(
      "tsr_pat_key_",
    );
    expect(loadConfig({ env: { TESSERA_PAT_PREFIX: "tsr_" } }).auth.tokens.patPrefix).toBe("tsr_");
  });

  it("documents every key in docs/configuration.md", () => {
    const doc = readFileSync(new URL("../docs/configuration.md", import.meta.url), "utf8");
    for (const ref of CONFIG_REFERENCE) {
      expect(doc, `${ref.env} missing from docs/configuration.md`).toContain(ref.env);
      expect(doc).toContain(`\`${ref.path}\``);
    }
  });

  it("keeps every key, environment variable and default of the contract", () => {
    expect(CONFIG_REFERENCE.map((r) => `${r.path} ${r.env} ${r.default}`)).toEqual(CONTRACT);
    expect(new Set(CONFIG_REFERENCE.map((r) => r.env)).size).toBe(CONFIG_REFERENCE.length);
  });

  it("generates the reference from the schema: every loaded key is listed, with the default it gets", () => {
    const defaults = loadConfig({ env: {} });
    const listed = new Set(CONFIG_REFERENCE.map((r) => r.path));
    for (const path of leafPaths(defaults)) expect(listed, `${path} not in the reference`).toContain(path);
    for (const ref of CONFIG_REFERENCE) {
      const value = at(defaults, ref.path);
      // Keys whose default is computed at start (or generated) describe it in words; every
      // other key shows exactly what the schema applies.
      if (DEFAULT_IN_WORDS.has(ref.path)) continue;
      if (ref.default === "(unset)") expect(value, ref.path).toBeUndefined();
      else if (ref.default === "(none)") expect(value, ref.path).toEqual([]);
      else expect(String(value), ref.path).toBe(ref.default);
    }
  });

  it("reads every key from the environment variable the reference names", () => {
    const samples: Record<string, [string, unknown]> = {
      string: ["x", "x"],
      int: ["7", 7],
      bool: ["on", true],
      list: ["10.0.0.0/8, 192.168.0.1", ["10.0.0.0/8", "192.168.0.1"]],
    };
    for (const ref of CONFIG_REFERENCE) {
      const [raw, expected] = samples[ref.kind]!;
      let config: Config;
      try {
        config = loadConfig({ env: { [ref.env]: raw } });
      } catch (err) {
        // A value the key's own bounds refuse still proves the variable reached the key.
        expect((err as Error).message, ref.env).toContain(`\n  ${ref.path}`);
        continue;
      }
      expect(at(config, ref.path), ref.env).toEqual(expected);
    }
    expect(at(loadConfig({ env: { TESSERA_METRICS_LISTEN: "off" } }), "metrics.listen")).toBe("off");
  });

  it("refuses a schema key registered without its variable and description", () => {
    const documented = z.string().default("x").register(configKeys, { env: "TESSERA_X", description: "X." });
    expect(referenceOf(z.object({ a: z.object({ b: documented }) }))).toEqual([
      { path: "a.b", env: "TESSERA_X", kind: "string", default: "x", description: "X." },
    ]);
    expect(() => referenceOf(z.object({ a: z.object({ b: documented, c: z.number() }) }))).toThrow(/a\.c/);
  });

  it("keeps docs/configuration.md in sync with the schema (run `npm run docs` after changing a key)", () => {
    const committed = readFileSync(new URL("../docs/configuration.md", import.meta.url), "utf8");
    expect(committed).toBe(renderConfigDoc());
  });
});
