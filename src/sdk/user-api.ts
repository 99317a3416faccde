import type { Client } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TenantService } from "../../gen/tessera/v1/tenant_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { type FromEnvironmentOptions, resolveClientOptions } from "./environment.js";
import { UserAPICore, type UserAPIOptions } from "./user-api-core.js";

export type { CurrentUser, LoginResult, UserAPIOptions } from "./user-api-core.js";

/**
 * The Tessera client: one HTTP/2 connection (TLS, optionally mutual) to a server, the
 * session's tokens, and a typed client per service. Failed calls reject with typed
 * errors ({@link AuthenticationError}, {@link TokenExpiredError}, …).
 *
 * ```ts
 * const api = new UserAPI({ token: process.env.TESSERA_TOKEN, host: "localhost", certFolder: "./certs" });
 * if (await api.isAvailable()) console.log((await api.getUser()).username);
 * ```
 */
export class UserAPI extends UserAPICore {
  /** TokenService: personal access tokens and API keys. */
  readonly tokens: Client<typeof TokenService>;
  /** TenantService: tenants and applications. */
  readonly tenants: Client<typeof TenantService>;
  /** MachineUserService: machine users, their credentials, certificate bindings and backends. */
  readonly machineUsers: Client<typeof MachineUserService>;
  /** AuditService: the audit log (needs `admin:audit`; tenant-scoped). */
  readonly audit: Client<typeof AuditService>;
  /** VerificationService: verify a credential another service was presented (needs `auth:verify`, machine principals). */
  readonly verification: Client<typeof VerificationService>;
  /** The standard grpc.health.v1 service. */
  readonly health: Client<typeof Health>;

  constructor(options: UserAPIOptions = {}) {
    super(options);
    this.tokens = this.client(TokenService);
    this.tenants = this.client(TenantService);
    this.machineUsers = this.client(MachineUserService);
    this.audit = this.client(AuditService);
    this.verification = this.client(VerificationService);
    this.health = this.client(Health);
  }

  /**
   * Build a client from the environment and the credentials file: explicit options win,
   * then TESSERA_TOKEN / TESSERA_SERVER (host:port) / TESSERA_CERT_FOLDER /
   * TESSERA_CA_FILE, then the profile (`profile`, else TESSERA_PROFILE, else "default")
   * of ~/.tessera/credentials. The file is refused when group or others can read it.
   */
  static fromEnvironment(options: FromEnvironmentOptions = {}): UserAPI {
    return new UserAPI(resolveClientOptions(options).options);
  }

  /**
   * Whether the server answers its health check as SERVING. Never throws: any failure
   * (unreachable, TLS refused, timeout, not serving) is `false`.
   */
  async isAvailable(options: { timeoutMs?: number } = {}): Promise<boolean> {
    try {
      const res = await this.health.check({ service: "" }, { timeoutMs: options.timeoutMs ?? 5000 });
      return res.status === HealthCheckResponse_ServingStatus.SERVING;
    } catch {
      return false;
    }
  }
}
