// The RPCs machine principals call themselves (check their authentication, exchange their
// credential for an access token, register their backend's callback) and the backends' admin.
import { randomUUID } from "node:crypto";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { UniqueConstraintViolationException } from "@mikro-orm/core";
import type { MachineUserService } from "../../../gen/tessera/v1/machine_user_service_pb.js";
import { auditTarget } from "../../admission/audit.js";
import { assertMayManage } from "../../auth/authority.js";
import { parseScopeString } from "../../auth/scopes.js";
import type { Clock } from "../../clock.js";
import { requestState } from "../../context.js";
import { errors, TesseraError } from "../../errors.js";
import { Application, Backend, MachineUser } from "../../storage/machine-entities.js";
import {
  assertId,
  assertScopesHold,
  findReachable,
  noStore,
  principalChanged,
  principalOf,
  writeIfScopesHold,
} from "../common.js";
import { listPage, pageParams } from "../pagination.js";
import { visibleTenant } from "../tenant/tenant-service.js";
import { issueMachineAccessToken } from "./access-token.js";
import { normaliseCallbackUrl } from "./callback-url.js";
import type { MachineUserLookups } from "./lookups.js";
import type { MachineUserServiceDeps } from "./machine-user-service.js";
import { backendToProto } from "./messages.js";

type MachineRpcs =
  | "checkAuthentication"
  | "registerBackend"
  | "issueAccessToken"
  | "listBackends"
  | "deregisterBackend";

/** The handlers machine principals call, and the backends' listing and removal. */
export function machinePrincipalHandlers(
  deps: MachineUserServiceDeps,
  clock: Clock,
  { em, visibleMachineUser, listScope }: MachineUserLookups,
): Pick<ServiceImpl<typeof MachineUserService>, MachineRpcs> {
  return {
    async checkAuthentication(_req, ctx) {
      const principal = principalOf(ctx);
      return {
        authenticated: true,
        machineUserId: principal.id,
        tenantId: principal.tenantId ?? "",
        message: "Authentication successful",
      };
    },

    async registerBackend(req, ctx) {
      const principal = principalOf(ctx);
      const callbackUrl = normaliseCallbackUrl(req.callbackUrl, deps.allowLoopbackHttpCallbacks);
      if (req.version.length > 64)
        throw errors.invalidArgument("version must be at most 64 characters", "version");
      if (!req.applicationId) throw errors.invalidArgument("application_id is required", "application_id");
      const e = em(ctx);
      // One answer for an application that does not exist, belongs to another tenant, or
      // is not assigned to this machine user.
      const denied = () =>
        new TesseraError("ACCESS_DENIED", "the application is not assigned to this machine user");
      if (!principal.tenantId || !principal.applicationIds?.includes(req.applicationId)) throw denied();
      const app = await e.findOne(Application, { id: req.applicationId, tenantId: principal.tenantId });
      if (!app) throw denied();
      const now = new Date(clock());
      const upsert = async (): Promise<Backend> => {
        const existing = await e.findOne(Backend, { applicationId: app.id, callbackUrl });
        if (existing) {
          let owner: MachineUser | null = null;
          if (existing.machineUserId !== principal.id) {
            // Taking over another machine user's backend changes it (it becomes the caller's,
            // which whoever manages the caller may deregister): only with authority over it.
            owner = await e.findOne(MachineUser, { id: existing.machineUserId });
            if (owner) assertMayManage(principal, { scopes: parseScopeString(owner.scopes) });
          }
          existing.version = req.version;
          existing.machineUserId = principal.id;
          existing.updatedAt = now;
          // Committed only if the owner checked still owns it (not taken over meanwhile by one the
          // caller may not manage: claimed from it first) and still holds the scopes checked.
          const from = owner?.id;
          if (owner)
            await writeIfScopesHold(e, MachineUser, owner.id, owner.scopes, async (tx) => {
              const claimed = await tx.nativeUpdate(
                Backend,
                { id: existing.id, machineUserId: from },
                { updatedAt: now },
              );
              if (claimed === 0) throw principalChanged();
              await tx.flush();
            });
          else await e.flush();
          return existing;
        }
        const created = e.create(Backend, {
          id: randomUUID(),
          tenantId: app.tenantId,
          applicationId: app.id,
          machineUserId: principal.id,
          callbackUrl,
          version: req.version,
          createdAt: now,
          updatedAt: now,
        });
        await e.flush();
        return created;
      };
      let backend: Backend;
      try {
        backend = await upsert();
      } catch (err) {
        // A concurrent registration of the same URL won the insert: update that one.
        if (!(err instanceof UniqueConstraintViolationException)) throw err;
        e.clear();
        backend = await upsert();
      }
      auditTarget(requestState(ctx.values), { id: backend.id, tenantId: backend.tenantId });
      return { success: true, backendId: backend.id, message: "Backend registered successfully" };
    },

    async issueAccessToken(_req, ctx) {
      const issued = await issueMachineAccessToken(
        { jwt: deps.jwt, accessTokenTtlSeconds: deps.accessTokenTtlSeconds, clock },
        em(ctx),
        principalOf(ctx),
        requestState(ctx.values).certificate,
      );
      noStore(ctx);
      return {
        accessToken: issued.token,
        expiresAt: timestampFromDate(issued.expiresAt),
        tokenType: "Bearer",
        certificateBound: issued.certificateBound,
      };
    },

    async listBackends(req, ctx) {
      const paging = pageParams(req.pageSize, req.pageToken);
      const e = em(ctx);
      const where: { tenantId?: string; applicationId?: string; machineUserId?: string } =
        req.tenantId !== undefined
          ? { tenantId: (await visibleTenant(ctx, e, req.tenantId, "tenant_id")).id }
          : listScope(ctx);
      if (req.applicationId !== undefined) {
        assertId(req.applicationId, "application", "application_id");
        const app = await findReachable(ctx, e, Application, req.applicationId);
        if (!app) throw errors.notFound("application");
        where.applicationId = app.id;
      }
      if (req.machineUserId !== undefined)
        where.machineUserId = (await visibleMachineUser(ctx, req.machineUserId, "machine_user_id")).id;
      const { items, nextPageToken, totalSize } = await listPage(e, Backend, where, paging);
      return { backends: items.map(backendToProto), nextPageToken, totalSize };
    },

    async deregisterBackend(req, ctx) {
      assertId(req.id, "backend");
      const e = em(ctx);
      const backend = await findReachable(ctx, e, Backend, req.id);
      if (!backend) throw errors.notFound("backend");
      // Deregistering cuts the backend's machine user off its callbacks: a change to it.
      const owner = await e.findOne(MachineUser, { id: backend.machineUserId });
      if (owner) assertMayManage(principalOf(ctx), { scopes: parseScopeString(owner.scopes) });
      // Committed only if the owner checked still owns it (not taken over meanwhile by one the
      // caller may not manage) and still holds the scopes checked (not promoted meanwhile).
      await e.transactional(async (tx) => {
        const n = await tx.nativeDelete(Backend, { id: backend.id, machineUserId: backend.machineUserId });
        if (n === 0 && (await tx.count(Backend, { id: backend.id })) > 0) throw principalChanged();
        if (owner) await assertScopesHold(tx, MachineUser, owner.id, owner.scopes);
      });
      return {};
    },
  };
}
