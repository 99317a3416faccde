// The reads every MachineUserService handler starts from: the machine user the caller may see
// or manage (another tenant's reads as missing), and the rows shown with it.
import type { HandlerContext } from "@connectrpc/connect";
import { assertMayManage } from "../../auth/authority.js";
import { parseScopeString } from "../../auth/scopes.js";
import { errors } from "../../errors.js";
import {
  Application,
  MachineCredential,
  MachineUser,
  MachineUserApplication,
  MachineUserCertificate,
} from "../../storage/machine-entities.js";
import type { Storage } from "../../storage/orm.js";
import { requestEms } from "../../storage/request-em.js";
import { assertId, findReachable, principalOf, tenantWhere } from "../common.js";
import { type MachineDetails, machineUserToProto } from "./messages.js";

/** The lookups of {@link createMachineUserLookups}, passed to each group of handlers. */
export type MachineUserLookups = ReturnType<typeof createMachineUserLookups>;

/** The request-scoped reads shared by the MachineUserService handlers. */
export function createMachineUserLookups(storage: Storage) {
  const em = requestEms(storage.em);

  /** A machine user visible to the caller, or NotFound (another tenant's reads as missing). */
  async function visibleMachineUser(ctx: HandlerContext, id: string, field = "id"): Promise<MachineUser> {
    assertId(id, "machine user", field);
    const mu = await findReachable(ctx, em(ctx), MachineUser, id);
    if (!mu) throw errors.notFound("machine user");
    return mu;
  }

  /**
   * A visible machine user the caller may manage (assertMayManage: its current scopes and
   * `resulting` are covered by the caller's), for every RPC that changes it, its
   * credentials, bindings or backends.
   */
  async function managedMachineUser(
    ctx: HandlerContext,
    id: string,
    field = "id",
    resulting?: readonly string[],
  ): Promise<MachineUser> {
    const mu = await visibleMachineUser(ctx, id, field);
    assertMayManage(principalOf(ctx), { scopes: parseScopeString(mu.scopes) }, resulting);
    return mu;
  }

  async function details(
    ctx: HandlerContext,
    users: readonly MachineUser[],
  ): Promise<Map<string, MachineDetails>> {
    const ids = users.map((u) => u.id);
    const out = new Map<string, MachineDetails>(
      ids.map((id) => [id, { credentials: [], applicationIds: [], certificates: [] }]),
    );
    if (ids.length === 0) return out;
    const e = em(ctx);
    for (const c of await e.find(MachineCredential, { machineUserId: { $in: ids } }))
      out.get(c.machineUserId)!.credentials.push(c);
    for (const a of await e.find(MachineUserApplication, { machineUserId: { $in: ids } })) {
      out.get(a.machineUserId)!.applicationIds.push(a.applicationId);
    }
    for (const b of await e.find(
      MachineUserCertificate,
      { machineUserId: { $in: ids } },
      { orderBy: { createdAt: "asc", id: "asc" } },
    )) {
      out.get(b.machineUserId)!.certificates.push(b);
    }
    return out;
  }

  async function toProto(ctx: HandlerContext, mu: MachineUser) {
    return machineUserToProto(mu, (await details(ctx, [mu])).get(mu.id)!);
  }

  /** Application ids (deduplicated) that all exist in `tenantId`, or NotFound. */
  async function tenantApplications(
    ctx: HandlerContext,
    tenantId: string,
    ids: readonly string[],
  ): Promise<string[]> {
    const unique = [...new Set(ids)];
    for (const id of unique) assertId(id, "application", "application_ids");
    if (unique.length === 0) return [];
    const found = await em(ctx).count(Application, { id: { $in: unique }, tenantId });
    if (found !== unique.length) throw errors.notFound("application");
    return unique;
  }

  function listScope(ctx: HandlerContext): { tenantId?: string } {
    return tenantWhere(principalOf(ctx), "tenantId");
  }

  return { em, visibleMachineUser, managedMachineUser, details, toProto, tenantApplications, listScope };
}
