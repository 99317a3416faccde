// The parts of a running Tessera (storage, keys, verifiers, limits, audit, metrics, services)
// built and wired together once, independent of the transport that serves them.
import type { DescService } from "@bufbuild/protobuf";
import type { ConnectRouter, Interceptor } from "@connectrpc/connect";
import type { Logger } from "pino";
import { type AccessLog, accessLogOf } from "./access-log.js";
import { createAdmissionInterceptor } from "./admission/index.js";
import { createPasswordShedding, type PasswordShedding } from "./admission/shedding.js";
import { type AuditLog, auditLineTo, createAuditLog } from "./audit.js";
import type { Authenticator } from "./auth/authenticator.js";
import { configureHashPool, hashPool } from "./auth/hash-pool.js";
import type { JwtService } from "./auth/jwt.js";
import { LastUsedTracker } from "./auth/last-used.js";
import { PasswordUpgrader } from "./auth/password-upgrade.js";
import { VerifiedSecretCache } from "./auth/secret-cache.js";
import { createVerifierChain } from "./auth/verifier-chain.js";
import { type BootstrapResult, ensureDefaultTenant } from "./bootstrap.js";
import { createHttpObserver } from "./call-observer.js";
import { type Clock, systemClock } from "./clock.js";
import type { Config } from "./config.js";
import {
  createAuditInterceptor,
  createErrorInterceptor,
  createInputInterceptor,
} from "./interceptors/index.js";
import { createLogger } from "./logger.js";
import { createMetrics, type Metrics, metricsOff } from "./metrics.js";
import { createOAuthEndpoints, type OAuthEndpoints } from "./oauth/index.js";
import { createRateLimits, type RateLimits, spentAddressRefusal } from "./rate-limit.js";
import { ServingState } from "./services/health/serving-state.js";
import { createServiceRoutes } from "./services/routes.js";
import { startSessionPruner } from "./services/user/session-pruning.js";
import { SessionIssuer } from "./services/user/sessions.js";
import { bootstrapUnderLock } from "./startup.js";
import { initORM, type Storage } from "./storage/orm.js";
import type { PgNotifier } from "./storage/pg-notify.js";
import { createStateNotifier, stateChannelOf, subscribeKeyChanges } from "./storage/pg-state-channel.js";
import { AuditEventRepository } from "./storage/repositories/audit.js";
import { CredentialRepository } from "./storage/repositories/credentials.js";
import { RevocationEventRepository } from "./storage/repositories/revocation-events.js";
import { MachineStateRepository, UserStateRepository } from "./storage/repositories/subject-state.js";
import { createSqlRunner, type SqlRunner } from "./storage/sql.js";
import { RevocationFeed } from "./verification/revocation-feed.js";
import { type CredentialVerifier, createCredentialVerifier } from "./verification/verify-credential.js";

export { VERSION } from "./version.js";

/** Everything a running Tessera is made of, independent of the transport serving it. */
export interface App {
  config: Config;
  logger: Logger;
  /** The clock of every expiry it sets and checks ({@link CreateAppOptions.clock}). */
  clock: Clock;
  /** Where access lines go (`logger`'s destination unless createApp was given another). */
  accessLog: AccessLog;
  storage: Storage;
  sql: SqlRunner;
  /**
   * PostgreSQL: this instance's listening session (LISTEN/NOTIFY), with its online signal.
   * Reusable: subscribe another channel with `notifier.subscribe(channel, fn)`.
   */
  notifier: PgNotifier | undefined;
  jwt: JwtService;
  authenticator: Authenticator;
  /** The verification core of VerifyCredential and /oauth2/introspect (credentials other services were presented). */
  verifier: CredentialVerifier;
  /** This instance's one reader of the revocation feed, behind every WatchRevocations stream; the server drains it at shutdown. */
  revocations: RevocationFeed;
  /** Where a shutdown is (the server steps it): grpc.health.v1.Health follows it. */
  serving: ServingState;
  limits: RateLimits | undefined;
  audit: AuditLog;
  /** The Prometheus metrics; undefined when `metrics.listen` is off (nothing is counted then). */
  metrics: Metrics | undefined;
  /** Password checks refused before their body while the hash pool is full (admission/shedding.ts). */
  shedding: PasswordShedding;
  /** Shared cache of verified secrets (Basic passwords, opaque tokens): PBKDF2 once per secret. */
  secrets: VerifiedSecretCache;
  /** Coalesced last-used timestamps of credentials. */
  lastUsed: LastUsedTracker;
  /** The admin bootstrap outcome of this start (a generated password is in it once). */
  bootstrap: BootstrapResult;
  /** The OAuth 2.0 endpoints (token, revocation, discovery), served by the HTTP layer. */
  oauth: OAuthEndpoints;
  /** Tessera services, in the order they are registered. */
  services: DescService[];
  /** Registers every service on a Connect router. */
  routes: (router: ConnectRouter) => void;
  /** Interceptor chain, outermost first. */
  interceptors: Interceptor[];
  defaultTenantId(): Promise<string>;
  startedAt: number;
  /**
   * Write the buffered audit events and last-used times, retrying through a database
   * outage for up to `deadlineMs` (default 10 s each); the server's shutdown calls it
   * (through {@link App.close}) before the database is closed.
   */
  flushBuffers(deadlineMs?: number): Promise<void>;
  /** Stop: flush the buffers ({@link App.flushBuffers}), then close rate limits and the database. */
  close(): Promise<void>;
}

/** Options for {@link createApp}. */
export interface CreateAppOptions {
  logger?: Logger;
  /**
   * The clock of every expiry, grace period and token lifetime Tessera sets and checks
   * (default: the machine's). Tests pass a manual one to step across an instant exactly.
   */
  clock?: Clock;
  /**
   * Run once the database is reached and migrated, before the bootstrap creates anything
   * (admin, tenant, keys): `tessera serve` creates its development certificates here, so
   * that a database it cannot reach or migrate fails the start with no files written.
   */
  beforeBootstrap?: () => Promise<void>;
  /** Where access lines go (default: `logger`'s destination); `tessera serve` gives a buffered one (access-log.ts). */
  accessLog?: AccessLog;
  /**
   * Called once the bootstrap admin is created with a generated password (in
   * `generatedPassword`), before any later step of the start can fail it: the password is in
   * no other place, and a later start finds the admin made. `tessera serve` shows it here.
   */
  onAdminCreated?: (bootstrap: BootstrapResult) => void;
}

/** The application: storage (migrated), admin bootstrap, keys, verifiers, interceptors, services (not HTTP/TLS: server.ts). */
export async function createApp(config: Config, options: CreateAppOptions = {}): Promise<App> {
  const logger = options.logger ?? createLogger(config.log.level);
  const clock = options.clock ?? systemClock;
  // Before anything hashes (the admin bootstrap does): every PBKDF2 goes through this pool.
  configureHashPool({
    ...(config.auth.hashConcurrency !== undefined ? { concurrency: config.auth.hashConcurrency } : {}),
    ...(config.auth.hashQueue !== undefined ? { queue: config.auth.hashQueue } : {}),
    nice: config.auth.hashNice,
    idle: config.auth.hashIdle,
    deadlineMs: config.auth.hashDeadlineMs,
  });
  const storage = await initORM({
    url: config.database.url,
    debug: config.database.debug,
    // With the service's log lines (stderr), not on stdout, which is for what commands print.
    log: (message) => logger.info({ orm: message }, "database"),
    // Below, under the start-up lock with the bootstrap.
    migrate: false,
    bounds: {
      statementTimeoutMs: config.database.statementTimeoutMs,
      connectTimeoutMs: config.database.connectTimeoutMs,
    },
  });
  let notifier: PgNotifier | undefined;
  // Made first, so that Redis connects while the database work below runs; awaited last.
  const limits = config.rateLimit.enabled
    ? createRateLimits(config.rateLimit, {
        logger: { warn: (m) => logger.warn(m), info: (m) => logger.info(m) },
      })
    : undefined;
  try {
    // One instance at a time migrates and bootstraps (tenant, admin, master key check, first
    // signing key): instances started together find each other's work done, not half done.
    const { bootstrap, jwt, digestKey } = await bootstrapUnderLock(storage, config, {
      logger,
      clock,
      beforeBootstrap: options.beforeBootstrap,
      onAdminCreated: options.onAdminCreated,
    });
    // PostgreSQL: one listening session per instance, subscribed (the state cache's channel)
    // before it starts, so that nothing committed after its first `online` is missed.
    notifier =
      storage.target.kind === "postgresql"
        ? await createStateNotifier(storage, logger, config.database.barrierTimeoutMs)
        : undefined;
    const sql = await createSqlRunner(storage, {
      stateCacheSize: config.database.stateCacheSize,
      barrierTimeoutMs: config.database.barrierTimeoutMs,
      logger,
      clock,
      ...(notifier ? { notifier } : {}),
    });
    // A key created by another instance is read here when its notification arrives (the
    // poll of auth.jwt.keyRefreshMs stays as the fallback while the listener is down).
    if (notifier)
      subscribeKeyChanges(notifier, await stateChannelOf(storage), () => {
        jwt.keysChanged().catch(() => undefined);
      });
    const revocationEvents = new RevocationEventRepository(sql);
    const revocations = new RevocationFeed({
      events: revocationEvents,
      ...(notifier ? { notifier, channel: await stateChannelOf(storage) } : {}),
      pollMs: config.verification.watchPollMs,
      retentionSeconds: config.verification.revocationRetentionSeconds,
      maxEvents: config.verification.revocationMaxEvents,
      logger,
    });
    // SQLite: the state tables' triggers announce a write as it is made; the feed reads once
    // the writing statement (and its transaction) is over, instead of at the next poll.
    if (sql.onStateChange) {
      let queued = false;
      sql.onStateChange(() => {
        if (queued) return;
        queued = true;
        setImmediate(() => {
          queued = false;
          revocations.wake();
        });
      });
    }
    // Subscribed before the notifier starts, like the state cache.
    await revocations.start();
    await notifier?.start();
    let defaultTenant: string | undefined;
    const defaultTenantId = async () => {
      defaultTenant ??= await ensureDefaultTenant(storage.em.fork());
      return defaultTenant;
    };
    const users = new UserStateRepository(sql);
    const machines = new MachineStateRepository(sql);
    const credentials = new CredentialRepository(sql);
    const secrets = new VerifiedSecretCache({
      maxBytes: config.auth.tokens.cacheMaxBytes,
      maxEntries: config.auth.tokens.cacheSize,
      sharedKey: config.auth.tokens.sharedDigests ? digestKey : undefined,
      logger,
    });
    const lastUsed = new LastUsedTracker(credentials, logger, config.auth.tokens.lastUsedFlushSeconds, {
      maxPending: config.audit.bufferSize,
    });
    const passwords = new PasswordUpgrader(config.auth.passwordIterations, logger);
    const chain = { passwords, jwt, users, machines, credentials, secrets, lastUsed, clock };
    const authenticator = createVerifierChain(config, chain);
    const auditEvents = new AuditEventRepository(sql);
    const audit = createAuditLog({
      events: auditEvents,
      logger,
      bufferSize: config.audit.bufferSize,
      retentionDays: config.audit.retentionDays,
      clock,
      // `tessera serve`'s buffered writer (no fields of a logger of its own): audit lines go
      // with the access lines, off the request's path; through a given logger otherwise.
      ...(options.accessLog && !options.accessLog.writeFields
        ? { line: auditLineTo(options.accessLog) }
        : {}),
    });
    const shedding = createPasswordShedding({
      hasRoom: () => hashPool().hasRoom(),
      logger,
      ...(limits ? { spentAddress: (ip: string) => spentAddressRefusal(limits, ip) } : {}),
    });
    const metrics = metricsOff(config.metrics.listen)
      ? undefined
      : createMetrics({
          sql,
          audit,
          lastUsed,
          limits,
          storage,
          secrets,
          passwords,
          shedding,
          watch: revocations,
        });

    const verifier = createCredentialVerifier({
      authenticator,
      limits,
      audit,
      prefixes: [
        config.auth.tokens.patPrefix,
        config.auth.tokens.apiKeyPrefix,
        config.auth.tokens.machinePrefix,
      ],
    });
    const sessions = new SessionIssuer(
      jwt,
      config.auth.jwt.refreshTokenTtl,
      clock,
      config.auth.sessionMaxLifetime,
    );
    const serving = new ServingState();
    const { services, routes } = createServiceRoutes({
      serving,
      passwords,
      verifier,
      revocations,
      revocationEvents,
      sql,
      logger,
      sessions,
      config,
      storage,
      jwt,
      users,
      machines,
      auditEvents,
      audit,
      limits,
      clock,
      defaultTenantId,
    });

    const sessionPruner = startSessionPruner(storage.em, {
      intervalSeconds: config.auth.sessionPruneInterval,
      refreshTokenTtlSeconds: config.auth.jwt.refreshTokenTtl,
      maxTokenTtlSeconds: config.auth.maxTokenTtl,
      clockSkewSeconds: config.auth.jwt.clockSkew,
      now: clock,
      logger,
    });

    const accessLog = options.accessLog ?? accessLogOf(logger);
    const oauth = createOAuthEndpoints({
      verifier,
      observe: createHttpObserver({ metrics, log: accessLog, access: config.log.access }),
      authenticator,
      limits,
      audit,
      storage,
      jwt,
      sessions,
      clock,
      logger,
      accessTokenTtlSeconds: config.auth.jwt.accessTokenTtl,
      clockSkewSeconds: config.auth.jwt.clockSkew,
      prefixes: {
        pat: config.auth.tokens.patPrefix,
        apiKey: config.auth.tokens.apiKeyPrefix,
        machine: config.auth.tokens.machinePrefix,
      },
      issuer: config.auth.oauth.issuer,
      tls: !config.server.insecurePlaintext,
      maxBodyBytes: config.server.maxBodyBytes,
    });

    const interceptors: Interceptor[] = [
      createErrorInterceptor({ logger }),
      // Per-IP limit, authentication, authorization, and the audit of the calls it refuses.
      createAdmissionInterceptor({ authenticator, limits, audit }),
      // The calls admission let in: recorded whether they succeed or fail.
      createAuditInterceptor({ audit }),
      // Innermost: every string field checked before a service (and so the ORM) sees it.
      createInputInterceptor(),
    ];
    // Before the server listens: a call made before Redis is ready would count per instance.
    // Bounded, and a Redis that is down starts the service anyway (limited per instance).
    await limits?.connected();

    return {
      config,
      logger,
      clock,
      accessLog,
      storage,
      sql,
      notifier,
      jwt,
      authenticator,
      verifier,
      revocations,
      serving,
      limits,
      audit,
      metrics,
      shedding,
      secrets,
      lastUsed,
      bootstrap,
      oauth,
      services,
      routes,
      interceptors,
      defaultTenantId,
      startedAt: Date.now(),
      async flushBuffers(deadlineMs?: number) {
        await Promise.all([lastUsed.close(deadlineMs), audit.close(deadlineMs)]);
      },
      async close() {
        revocations.close();
        jwt.close();
        await sessionPruner.close();
        metrics?.close();
        shedding.flush();
        // The SQLite gates report last (a read refused while the pool shut down too), and even if a close failed.
        await Promise.all([lastUsed.close(), audit.close()])
          .then(() => limits?.close())
          .then(() => notifier?.close())
          .then(() => storage.close())
          .finally(() => sql.flushReports?.());
      },
    };
  } catch (err) {
    await limits?.close();
    await notifier?.close();
    await storage.close();
    throw err;
  }
}
