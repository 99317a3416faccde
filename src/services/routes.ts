// Every RPC service one Tessera serves, built from the app's parts, and their registration on
// a Connect router: the list a newcomer reads to find which file answers which service.
import type { DescFile, DescService } from "@bufbuild/protobuf";
import type { ConnectRouter } from "@connectrpc/connect";
import type { Logger } from "pino";
import { file_google_rpc_error_details } from "../../gen/google/rpc/error_details_pb.js";
import { file_google_rpc_status } from "../../gen/google/rpc/status_pb.js";
import { file_grpc_health_v1_health, Health } from "../../gen/grpc/health/v1/health_pb.js";
import {
  file_grpc_reflection_v1_reflection,
  ServerReflection as ReflectionV1,
} from "../../gen/grpc/reflection/v1/reflection_pb.js";
import {
  file_grpc_reflection_v1alpha_reflection,
  ServerReflection as ReflectionV1Alpha,
} from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { AuditService, file_tessera_v1_audit_service } from "../../gen/tessera/v1/audit_service_pb.js";
import {
  file_tessera_v1_machine_user_service,
  MachineUserService,
} from "../../gen/tessera/v1/machine_user_service_pb.js";
import { file_tessera_v1_tenant_service, TenantService } from "../../gen/tessera/v1/tenant_service_pb.js";
import { file_tessera_v1_token_service, TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { file_tessera_v1_user_service, UserService } from "../../gen/tessera/v1/user_service_pb.js";
import {
  file_tessera_v1_verification_service,
  VerificationService,
} from "../../gen/tessera/v1/verification_service_pb.js";
import { assertAuthRules } from "../admission/index.js";
import type { AuditLog } from "../audit.js";
import type { JwtService } from "../auth/jwt.js";
import type { PasswordUpgrader } from "../auth/password-upgrade.js";
import type { Clock } from "../clock.js";
import type { Config } from "../config.js";
import type { RateLimits } from "../rate-limit.js";
import type { Storage } from "../storage/orm.js";
import type { AuditEventRepository } from "../storage/repositories/audit.js";
import type { RevocationEventRepository } from "../storage/repositories/revocation-events.js";
import type { MachineStateRepository, UserStateRepository } from "../storage/repositories/subject-state.js";
import type { SqlRunner } from "../storage/sql.js";
import { RevocationCatchUp } from "../verification/revocation-catch-up.js";
import type { RevocationFeed } from "../verification/revocation-feed.js";
import type { CredentialVerifier } from "../verification/verify-credential.js";
import { createAuditService } from "./audit/audit-service.js";
import { createHealthService } from "./health/health-service.js";
import type { ServingState } from "./health/serving-state.js";
import { createMachineUserService } from "./machine-user/machine-user-service.js";
import { createReflectionServices } from "./reflection/reflection-service.js";
import { createTenantService } from "./tenant/tenant-service.js";
import { createTokenService } from "./token/token-service.js";
import type { SessionIssuer } from "./user/sessions.js";
import { createUserService } from "./user/user-service.js";
import { createVerificationService } from "./verification/verification-service.js";

/** What the services are built from. */
export interface ServiceRoutesDeps {
  config: Config;
  storage: Storage;
  jwt: JwtService;
  users: UserStateRepository;
  /** Machine-user state (WatchRevocations re-reads whom a caller's certificate authenticates as). */
  machines: MachineStateRepository;
  auditEvents: AuditEventRepository;
  audit: AuditLog;
  limits: RateLimits | undefined;
  clock: Clock;
  defaultTenantId: () => Promise<string>;
  /** Sessions: login, refresh-token rotation (shared with the OAuth token endpoint). */
  sessions: SessionIssuer;
  /** The verification core VerifyCredential answers from. */
  verifier: CredentialVerifier;
  /** The revocation feed WatchRevocations streams from, and its events (for a stream catching up). */
  revocations: RevocationFeed;
  revocationEvents: RevocationEventRepository;
  /** The state cache a caller ahead of the feed's position empties (VerifyCredential's `min_revocation_position`). */
  sql: Pick<SqlRunner, "evictState">;
  logger: Logger;
  /** Re-hashes a password Login accepted when its hash is outdated (shared with HTTP Basic). */
  passwords: PasswordUpgrader;
  /** Where a shutdown is: health answers NOT_SERVING from its start. */
  serving: ServingState;
}

/** Tessera's services (each checked to declare its auth rules) and the function registering all of them. */
export function createServiceRoutes(deps: ServiceRoutesDeps): {
  services: DescService[];
  routes: (router: ConnectRouter) => void;
} {
  const { config, storage, jwt, users, audit, limits, clock, defaultTenantId, sessions } = deps;
  const services: DescService[] = [
    UserService,
    TokenService,
    TenantService,
    MachineUserService,
    AuditService,
    VerificationService,
  ];
  assertAuthRules(services);
  const files: DescFile[] = [
    file_tessera_v1_user_service,
    file_tessera_v1_token_service,
    file_tessera_v1_tenant_service,
    file_tessera_v1_machine_user_service,
    file_tessera_v1_audit_service,
    file_tessera_v1_verification_service,
    // The error detail of every error (google.rpc.ErrorInfo) and the gRPC status carrying
    // it: served so that reflection clients (grpcurl, buf curl) can show it.
    file_google_rpc_error_details,
    file_google_rpc_status,
    file_grpc_health_v1_health,
    file_grpc_reflection_v1_reflection,
    file_grpc_reflection_v1alpha_reflection,
  ];
  const servedNames = [...services, Health, ReflectionV1, ReflectionV1Alpha].map((s) => s.typeName);
  const reflection = createReflectionServices(files, servedNames, {
    max: config.server.maxStreamMessages,
    limits,
  });
  const userService = createUserService({
    storage,
    sessions,
    passwordIterations: config.auth.passwordIterations,
    defaultTenantId,
    limits,
    users,
    upgrader: deps.passwords,
  });
  const tokenService = createTokenService({
    storage,
    iterations: config.auth.passwordIterations,
    patPrefix: config.auth.tokens.patPrefix,
    apiKeyPrefix: config.auth.tokens.apiKeyPrefix,
    limits,
    clock,
  });
  const tenantService = createTenantService({ storage, defaultTenantId });
  const machineUserService = createMachineUserService({
    storage,
    jwt,
    tokenPrefix: config.auth.tokens.machinePrefix,
    passwordIterations: config.auth.passwordIterations,
    accessTokenTtlSeconds: config.auth.jwt.accessTokenTtl,
    clockSkewSeconds: config.auth.jwt.clockSkew,
    clock,
    allowLoopbackHttpCallbacks: config.server.allowLoopbackHttpCallbacks,
    defaultTenantId,
    limits,
    audit,
  });
  const auditService = createAuditService({ events: deps.auditEvents });
  const verificationService = createVerificationService({
    verifier: deps.verifier,
    catchUp: new RevocationCatchUp({ feed: deps.revocations, events: deps.revocationEvents, sql: deps.sql }),
    watch: {
      feed: deps.revocations,
      events: deps.revocationEvents,
      heartbeatSeconds: config.verification.watchHeartbeatSeconds,
      maxStreamsPerCaller: config.verification.watchMaxStreamsPerCaller,
      maxStreams: config.verification.watchMaxStreams,
      maxStreamMs: config.server.maxStreamSeconds * 1000,
      clock,
      machines: deps.machines,
    },
  });
  const health = createHealthService({
    ping: () => storage.ping(),
    services: services.map((s) => s.typeName),
    maxWatchMs: config.server.maxStreamSeconds * 1000,
    serving: deps.serving,
  });
  return {
    services,
    routes(router) {
      router.service(UserService, userService);
      router.service(TokenService, tokenService);
      router.service(TenantService, tenantService);
      router.service(MachineUserService, machineUserService);
      router.service(AuditService, auditService);
      router.service(VerificationService, verificationService);
      router.service(Health, health);
      router.service(ReflectionV1, reflection.v1);
      router.service(ReflectionV1Alpha, reflection.v1alpha);
    },
  };
}
