// MachineUserService assembled from its concepts: administration, certificate bindings, and
// the RPCs machine principals call themselves, over shared request-scoped lookups.
import type { ServiceImpl } from "@connectrpc/connect";
import type { MachineUserService } from "../../../gen/tessera/v1/machine_user_service_pb.js";
import type { AuditLog } from "../../audit.js";
import type { JwtService } from "../../auth/jwt.js";
import { type Clock, systemClock } from "../../clock.js";
import type { RateLimits } from "../../rate-limit.js";
import type { Storage } from "../../storage/orm.js";
import { machineUserAdminHandlers } from "./admin-handlers.js";
import { certificateBindingHandlers } from "./certificate-binding.js";
import { createMachineUserLookups } from "./lookups.js";
import { machinePrincipalHandlers } from "./machine-principal-handlers.js";

/** Dependencies of the MachineUserService implementation. */
export interface MachineUserServiceDeps {
  storage: Storage;
  jwt: JwtService;
  /** auth.tokens.machinePrefix */
  tokenPrefix: string;
  /** auth.passwordIterations */
  passwordIterations: number;
  /** auth.jwt.accessTokenTtl */
  accessTokenTtlSeconds: number;
  /**
   * auth.jwt.clockSkew: how far another instance's clock may differ. Tokens expire exactly
   * (no tolerance on exp), so it only widens the fail-closed window in which a rotation
   * keeps an earlier rotation's cut-off.
   */
  clockSkewSeconds: number;
  /** The clock of rotations, grace periods and token lifetimes (tests pass a manual one). */
  clock?: Clock;
  /** server.allowLoopbackHttpCallbacks */
  allowLoopbackHttpCallbacks: boolean;
  defaultTenantId: () => Promise<string>;
  /** When set: new credentials counted per caller (`rateLimit.credentialCreationsPerHour`). */
  limits?: RateLimits | undefined;
  /** Where a displaced certificate binding is recorded (see BindCertificate). */
  audit?: Pick<AuditLog, "record"> | undefined;
}

/**
 * MachineUserService: administration of machine users (admins, within their tenant;
 * `*` across tenants) and the three RPCs machine principals call themselves.
 */
export function createMachineUserService(
  deps: MachineUserServiceDeps,
): ServiceImpl<typeof MachineUserService> {
  const clock = deps.clock ?? systemClock;
  const lookups = createMachineUserLookups(deps.storage);
  return {
    ...machineUserAdminHandlers(deps, clock, lookups),
    ...certificateBindingHandlers(deps, clock, lookups),
    ...machinePrincipalHandlers(deps, clock, lookups),
  };
}
