import type { DescFile, DescService } from "@bufbuild/protobuf";
import type { ConnectRouter, Interceptor } from "@connectrpc/connect";
import type { Logger } from "pino";
import { file_grpc_health_v1_health, Health } from "../gen/grpc/health/v1/health_pb.js";
import {
  file_grpc_reflection_v1_reflection,
  ServerReflection as ReflectionV1,
} from "../gen/grpc/reflection/v1/reflection_pb.js";
import {
  file_grpc_reflection_v1alpha_reflection,
  ServerReflection as ReflectionV1Alpha,
} from "../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { file_tessera_v1_error_details } from "../gen/tessera/v1/error_details_pb.js";
import {
  file_tessera_v1_machine_user_service,
  MachineUserService,
} from "../gen/tessera/v1/machine_user_service_pb.js";
import { file_tessera_v1_tenant_service, TenantService } from "../gen/tessera/v1/tenant_service_pb.js";
import { file_tessera_v1_token_service, TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { file_tessera_v1_user_service, UserService } from "../gen/tessera/v1/user_service_pb.js";
import { type AuditLog, createAuditLog } from "./audit.js";
import { createAdminTokenVerifier } from "./auth/admin-token.js";
import { Authenticator, createJwtBearerVerifier } from "./auth/authenticator.js";
import { configureHashPool } from "./auth/hash-pool.js";
import { createJwtService, type JwtService } from "./auth/jwt.js";
import { LastUsedTracker } from "./auth/last-used.js";
import {
  createMachineBasicVerifier,
  createMachineBearerVerifier,
  createMachineCertificateVerifier,
  createMachineClaimsLoader,
  MACHINE_USERNAME_PREFIX,
  MachineStateReader,
} from "./auth/machine-principal.js";
import { loadMasterKey, loadPreviousMasterKeys, sealStoredSigningKeys } from "./auth/master-key.js";
import { VerifiedSecretCache } from "./auth/secret-cache.js";
import { createApiTokenVerifier } from "./auth/token-verifier.js";
import { createUserBasicVerifier, createUserClaimsLoader, UserStateReader } from "./auth/user-principal.js";
import { type BootstrapResult, ensureAdmin, ensureDefaultTenant } from "./bootstrap.js";
import type { Config } from "./config.js";
import { createAuditInterceptor } from "./interceptors/audit.js";
import { assertAuthRules } from "./interceptors/auth-rule.js";
import { createAuthnInterceptor } from "./interceptors/authn.js";
import { createAuthzInterceptor } from "./interceptors/authz.js";
import { createErrorInterceptor } from "./interceptors/errors.js";
import { createInputInterceptor } from "./interceptors/input.js";
import { createRateLimitInterceptor } from "./interceptors/rate-limit.js";
import { createLogger } from "./logger.js";
import { createRateLimits, type RateLimits } from "./rate-limit.js";
import { createHealthService } from "./services/health/health-service.js";
import { createMachineUserService } from "./services/machine-user/machine-user-service.js";
import { createReflectionServices } from "./services/reflection/reflection-service.js";
import { createTenantService } from "./services/tenant/tenant-service.js";
import { createTokenService } from "./services/token/token-service.js";
import { SessionIssuer } from "./services/user/sessions.js";
import { createUserService } from "./services/user/user-service.js";
import { initORM, type Storage } from "./storage/orm.js";
import type { PgNotifier } from "./storage/pg-notify.js";
import { createStateNotifier } from "./storage/pg-state.js";
import { createSqlRunner, type SqlRunner } from "./storage/sql.js";

export { VERSION } from "./version.js";

/** Everything a running Tessera is made of, independent of the transport serving it. */
export interface App {
  config: Config;
  logger: Logger;
  storage: Storage;
  sql: SqlRunner;
  /**
   * PostgreSQL: this instance's listening session (LISTEN/NOTIFY), with its online signal.
   * Reusable: subscribe another channel with `notifier.subscribe(channel, fn)`.
   */
  notifier: PgNotifier | undefined;
  jwt: JwtService;
  authenticator: Authenticator;
  limits: RateLimits | undefined;
  audit: AuditLog;
  /** Shared cache of verified secrets (Basic passwords, opaque tokens): PBKDF2 once per secret. */
  secrets: VerifiedSecretCache;
  /** Coalesced last-used timestamps of credentials. */
  lastUsed: LastUsedTracker;
  /** The admin bootstrap outcome of this start (a generated password is in it once). */
  bootstrap: BootstrapResult;
  /** Tessera services, in the order they are registered. */
  services: DescService[];
  /** Registers every service on a Connect router. */
  routes: (router: ConnectRouter) => void;
  /** Interceptor chain, outermost first. */
  interceptors: Interceptor[];
  defaultTenantId(): Promise<string>;
  startedAt: number;
  close(): Promise<void>;
}

/** Options for {@link createApp}. */
export interface CreateAppOptions {
  logger?: Logger;
}

/**
 * Build the application: storage (migrated), admin bootstrap, keys, verifiers,
 * interceptors and services. The HTTP/TLS layer lives in server.ts.
 */
export async function createApp(config: Config, options: CreateAppOptions = {}): Promise<App> {
  const logger = options.logger ?? createLogger(config.log.level);
  // Before anything hashes (the admin bootstrap does): every PBKDF2 goes through this pool.
  configureHashPool({
    ...(config.auth.hashConcurrency !== undefined ? { concurrency: config.auth.hashConcurrency } : {}),
    ...(config.auth.hashQueue !== undefined ? { queue: config.auth.hashQueue } : {}),
  });
  const storage = await initORM({
    url: config.database.url,
    debug: config.database.debug,
    // With the service's log lines (stderr), not on stdout, which is for what commands print.
    log: (message) => logger.info({ orm: message }, "database"),
    // Below, under the start-up lock with the bootstrap.
    migrate: false,
  });
  let notifier: PgNotifier | undefined;
  try {
    // One instance at a time migrates and bootstraps (tenant, admin, master key check, first
    // signing key): instances started together find each other's work done, not half done.
    const { bootstrap, jwt } = await storage.withStartupLock(async (held) => {
      await held.migrate();
      const bootstrap = await ensureAdmin(storage.em.fork(), {
        username: config.admin.username,
        password: config.admin.password,
        iterations: config.auth.passwordIterations,
      });
      // Before any key is read: clear rows sealed, and a wrong master key stops the start here.
      const masterKey = loadMasterKey(config.auth, storage.target);
      await sealStoredSigningKeys(storage, masterKey, loadPreviousMasterKeys(config.auth));
      const jwt = await createJwtService({
        config: config.auth.jwt,
        storage,
        masterKey,
        maxTokenTtlSeconds: config.auth.maxTokenTtl,
      });
      return { bootstrap, jwt };
    });
    // PostgreSQL: one listening session per instance, subscribed (the state cache's channel)
    // before it starts, so that nothing committed after its first `online` is missed.
    notifier = storage.target.kind === "postgresql" ? await createStateNotifier(storage, logger) : undefined;
    const sql = await createSqlRunner(storage, {
      stateCacheSize: config.database.stateCacheSize,
      logger,
      ...(notifier ? { notifier } : {}),
    });
    await notifier?.start();
    let defaultTenant: string | undefined;
    const defaultTenantId = async () => {
      defaultTenant ??= await ensureDefaultTenant(storage.em.fork());
      return defaultTenant;
    };
    const users = new UserStateReader(sql);
    const secrets = new VerifiedSecretCache(config.auth.tokens.cacheSize);
    const lastUsed = new LastUsedTracker(sql, logger, config.auth.tokens.lastUsedFlushSeconds);
    const authenticator = new Authenticator();
    const machines = new MachineStateReader(sql);
    // The static admin token first: one SHA-256, cheaper than any other check.
    if (config.admin.token) authenticator.bearer.push(createAdminTokenVerifier(config.admin.token));
    authenticator.bearer.push(
      createJwtBearerVerifier(jwt, {
        user: createUserClaimsLoader(users),
        machine: createMachineClaimsLoader(machines),
      }),
    );
    authenticator.bearer.push(
      createApiTokenVerifier({
        sql,
        secrets,
        lastUsed,
        patPrefix: config.auth.tokens.patPrefix,
        apiKeyPrefix: config.auth.tokens.apiKeyPrefix,
        otherPrefixes: [config.auth.tokens.machinePrefix],
      }),
    );
    if (config.auth.basic.enabled) {
      authenticator.basic.push(
        createUserBasicVerifier({
          users,
          secrets,
          iterations: config.auth.passwordIterations,
          reservedPrefixes: [MACHINE_USERNAME_PREFIX],
        }),
      );
    }
    authenticator.bearer.push(
      createMachineBearerVerifier({ machines, secrets, lastUsed, prefix: config.auth.tokens.machinePrefix }),
    );
    authenticator.basic.push(
      createMachineBasicVerifier({ machines, secrets, lastUsed, iterations: config.auth.passwordIterations }),
    );
    authenticator.certificate.push(createMachineCertificateVerifier({ machines, lastUsed }));
    const limits = config.rateLimit.enabled
      ? createRateLimits(config.rateLimit, {
          logger: { warn: (m) => logger.warn(m), info: (m) => logger.info(m) },
        })
      : undefined;
    const audit = createAuditLog({ sql, logger });
    const sessions = new SessionIssuer(jwt, config.auth.jwt.refreshTokenTtl);

    const services: DescService[] = [UserService, TokenService, TenantService, MachineUserService];
    assertAuthRules(services);
    const files: DescFile[] = [
      file_tessera_v1_user_service,
      file_tessera_v1_token_service,
      file_tessera_v1_tenant_service,
      file_tessera_v1_machine_user_service,
      file_tessera_v1_error_details,
      file_grpc_health_v1_health,
      file_grpc_reflection_v1_reflection,
      file_grpc_reflection_v1alpha_reflection,
    ];
    const servedNames = [...services, Health, ReflectionV1, ReflectionV1Alpha].map((s) => s.typeName);
    const reflection = createReflectionServices(files, servedNames);
    const userService = createUserService({
      storage,
      sessions,
      passwordIterations: config.auth.passwordIterations,
      defaultTenantId,
      limits,
      users,
    });
    const tokenService = createTokenService({
      storage,
      iterations: config.auth.passwordIterations,
      patPrefix: config.auth.tokens.patPrefix,
      apiKeyPrefix: config.auth.tokens.apiKeyPrefix,
      limits,
    });
    const tenantService = createTenantService({ storage, defaultTenantId });
    const machineUserService = createMachineUserService({
      storage,
      jwt,
      tokenPrefix: config.auth.tokens.machinePrefix,
      passwordIterations: config.auth.passwordIterations,
      accessTokenTtlSeconds: config.auth.jwt.accessTokenTtl,
      clockSkewSeconds: config.auth.jwt.clockSkew,
      allowLoopbackHttpCallbacks: config.server.allowLoopbackHttpCallbacks,
      defaultTenantId,
      limits,
    });
    const health = createHealthService({
      ping: () => storage.ping(),
      services: services.map((s) => s.typeName),
      maxWatchMs: config.server.maxStreamSeconds * 1000,
    });

    const interceptors: Interceptor[] = [
      createErrorInterceptor({ logger }),
      ...(limits ? [createRateLimitInterceptor({ limits })] : []),
      createAuditInterceptor({ audit }),
      createAuthnInterceptor({ authenticator, limits }),
      createAuthzInterceptor({ limits }),
      // Innermost: every string field checked before a service (and so the ORM) sees it.
      createInputInterceptor(),
    ];

    return {
      config,
      logger,
      storage,
      sql,
      notifier,
      jwt,
      authenticator,
      limits,
      audit,
      secrets,
      lastUsed,
      bootstrap,
      services,
      routes(router) {
        router.service(UserService, userService);
        router.service(TokenService, tokenService);
        router.service(TenantService, tenantService);
        router.service(MachineUserService, machineUserService);
        router.service(Health, health);
        router.service(ReflectionV1, reflection.v1);
        router.service(ReflectionV1Alpha, reflection.v1alpha);
      },
      interceptors,
      defaultTenantId,
      startedAt: Date.now(),
      async close() {
        jwt.close();
        await lastUsed.close();
        await audit.close();
        await limits?.close();
        await notifier?.close();
        await storage.close();
      },
    };
  } catch (err) {
    await notifier?.close();
    await storage.close();
    throw err;
  }
}
