/**
 * The Tessera client SDK (`import { UserAPI } from "@tessera/sdk"`, built from here by
 * packages/sdk; the server package re-exports it as `tessera/sdk`): the one barrel;
 * everything public is named here.
 */

export { Code } from "@connectrpc/connect";
export { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
export { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
export { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
export { TenantService } from "../../gen/tessera/v1/tenant_service_pb.js";
export { TokenKind, TokenService } from "../../gen/tessera/v1/token_service_pb.js";
export { UserService } from "../../gen/tessera/v1/user_service_pb.js";
export {
  VerificationCode,
  VerificationService,
  VerifiedPrincipalKind,
} from "../../gen/tessera/v1/verification_service_pb.js";
export { hasScope, scopeCovers } from "../auth/scopes.js";
export {
  CLIENT_ENV,
  credentialsPath,
  DEFAULT_PORT,
  DEFAULT_PROFILE,
  type Profile,
  parseServerAddress,
  readCredentialsFile,
  readProfile,
  type ServerAddress,
  writeProfile,
} from "./credentials.js";
export {
  type FromEnvironmentOptions,
  type ResolvedClientOptions,
  resolveClientOptions,
} from "./environment.js";
export { toClientError } from "./error-mapping.js";
export {
  AlreadyExistsError,
  AuthenticationError,
  ClientConfigError,
  type ClientErrorInit,
  CredentialsFileError,
  InvalidArgumentError,
  MessageTooLargeError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitedError,
  TesseraClientError,
  TokenExpiredError,
  UnavailableError,
} from "./errors.js";
export type { TesseraLogger } from "./logger.js";
export type { AutoRefreshOptions, TokenPair } from "./session.js";
export { type ClientTls, loadClientTls } from "./tls.js";
export { type CurrentUser, type LoginResult, UserAPI, type UserAPIOptions } from "./user-api.js";
export { UserAPICore } from "./user-api-core.js";
