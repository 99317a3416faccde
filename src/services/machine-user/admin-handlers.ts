// The administration RPCs of machine users (create, read, list, update, delete, rotate their
// credentials): admins within their tenant, `*` across tenants.
import { randomUUID } from "node:crypto";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { UniqueConstraintViolationException } from "@mikro-orm/core";
import type { MachineUserService } from "../../../gen/tessera/v1/machine_user_service_pb.js";
import { auditTarget } from "../../admission/audit.js";
import { assertMayManage, NEW_PRINCIPAL } from "../../auth/authority.js";
import { formatScopes } from "../../auth/scopes.js";
import type { Clock } from "../../clock.js";
import { requestState } from "../../context.js";
import { errors } from "../../errors.js";
import { countCredentialCreation } from "../../rate-limit.js";
import { commitCreation } from "../../storage/commit-outcome.js";
import { lockApplications, lockMachineUser } from "../../storage/lock-order.js";
import { MachineCredential, MachineUser, MachineUserApplication } from "../../storage/machine-entities.js";
import { assertScopesHold, noStore, principalChanged, principalOf, setScopesIfHeld } from "../common.js";
import { listPage, pageParams } from "../pagination.js";
import { assertDisplayName } from "../tenant/names.js";
import { targetTenantId, visibleTenant } from "../tenant/tenant-service.js";
import {
  raiseRevocationCutoff,
  raiseRotationCutoff,
  readRotationState,
  recordRotation,
  revokeMachineAccessTokens,
} from "./access-token.js";
import { newMachineCredential } from "./credentials.js";
import type { MachineUserLookups } from "./lookups.js";
import type { MachineUserServiceDeps } from "./machine-user-service.js";
import { authKind, machineUserToProto } from "./messages.js";

/** Longest grace period a rotation may give the previous credentials. */
export const MAX_GRACE_PERIOD_SECONDS = 30 * 24 * 3600;

type AdminRpcs =
  | "createMachineUser"
  | "getMachineUser"
  | "listMachineUsers"
  | "updateMachineUser"
  | "deleteMachineUser"
  | "rotateMachineUserCredentials";

/** The administration handlers of MachineUserService. */
export function machineUserAdminHandlers(
  deps: MachineUserServiceDeps,
  clock: Clock,
  {
    em,
    visibleMachineUser,
    managedMachineUser,
    details,
    toProto,
    tenantApplications,
    listScope,
  }: MachineUserLookups,
): Pick<ServiceImpl<typeof MachineUserService>, AdminRpcs> {
  return {
    async createMachineUser(req, ctx) {
      const principal = principalOf(ctx);
      const e = em(ctx);
      const tenantId = await targetTenantId(ctx, e, req.tenantId, deps.defaultTenantId);
      assertDisplayName(req.name);
      const kind = authKind(req.authType);
      assertMayManage(principal, NEW_PRINCIPAL, req.scopes);
      const applicationIds = await tenantApplications(ctx, tenantId, req.applicationIds);
      if (await e.count(MachineUser, { tenantId, name: req.name })) {
        throw errors.alreadyExists("a machine user with this name exists in the tenant");
      }
      await countCredentialCreation(deps.limits, principal);
      const now = new Date(clock());
      const id = randomUUID();
      const credential = await newMachineCredential(id, kind, {
        tokenPrefix: deps.tokenPrefix,
        iterations: deps.passwordIterations,
        now,
      });
      let created: MachineUser | undefined;
      try {
        // The credential is shown once: a lost COMMIT is settled (see commitCreation).
        await commitCreation(
          deps.storage,
          () =>
            e.transactional(async (tx) => {
              const mu = tx.create(MachineUser, {
                id,
                tenantId,
                name: req.name,
                authType: kind,
                scopes: formatScopes(req.scopes),
                disabled: false,
                createdAt: now,
                updatedAt: now,
              });
              // The parent row first: entities are schemas without relations, so the ORM
              // cannot order the inserts by foreign key itself.
              await tx.flush();
              tx.create(MachineCredential, credential.row);
              for (const applicationId of applicationIds)
                tx.create(MachineUserApplication, { machineUserId: id, applicationId });
              await tx.flush();
              created = mu;
            }),
          { kind: "machine user", id },
          async () => (await deps.storage.em.fork().count(MachineCredential, { id: credential.row.id })) > 0,
        );
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) {
          throw errors.alreadyExists("a machine user with this name exists in the tenant");
        }
        throw err;
      }
      if (created === undefined) throw new Error("the machine user's transaction ended without it");
      auditTarget(requestState(ctx.values), { id, tenantId: created.tenantId });
      noStore(ctx);
      return {
        machineUser: await toProto(ctx, created),
        token: credential.token,
        username: credential.username,
        password: credential.password,
      };
    },

    async getMachineUser(req, ctx) {
      return { machineUser: await toProto(ctx, await visibleMachineUser(ctx, req.id)) };
    },

    async listMachineUsers(req, ctx) {
      const paging = pageParams(req.pageSize, req.pageToken);
      const where =
        req.tenantId !== undefined
          ? { tenantId: (await visibleTenant(ctx, em(ctx), req.tenantId, "tenant_id")).id }
          : listScope(ctx);
      const page = await listPage(em(ctx), MachineUser, where, paging);
      const d = await details(ctx, page.items);
      return {
        machineUsers: page.items.map((u) => machineUserToProto(u, d.get(u.id)!)),
        nextPageToken: page.nextPageToken,
        totalSize: page.totalSize,
      };
    },

    async updateMachineUser(req, ctx) {
      const e = em(ctx);
      const mu = await managedMachineUser(ctx, req.id, "id", req.scopes?.scopes);
      const checked = mu.scopes;
      if (req.name !== undefined && req.name !== mu.name) {
        assertDisplayName(req.name);
        if (await e.count(MachineUser, { tenantId: mu.tenantId, name: req.name })) {
          throw errors.alreadyExists("a machine user with this name exists in the tenant");
        }
        mu.name = req.name;
      }
      if (req.scopes) mu.scopes = formatScopes(req.scopes.scopes);
      const applicationIds = req.applicationIds
        ? await tenantApplications(ctx, mu.tenantId, req.applicationIds.applicationIds)
        : null;
      if (req.disabled !== undefined) mu.disabled = req.disabled;
      mu.updatedAt = new Date(clock());
      let cutoff: number | undefined;
      try {
        await e.transactional(async (tx) => {
          if (applicationIds) {
            // The applications, then the machine user, then its assignments: the lock order
            // of DeleteApplication and DeleteMachineUser (storage/lock-order.ts). One deleted
            // since the check above is missing, as it would have been then.
            const locked = await lockApplications(tx, mu.tenantId, applicationIds);
            if (locked.length !== applicationIds.length) throw errors.notFound("application");
            if (!(await lockMachineUser(tx, mu.id, "no key update"))) throw errors.notFound("machine user");
            await setScopesIfHeld(tx, MachineUser, mu.id, checked, mu.scopes);
            await tx.nativeDelete(MachineUserApplication, { machineUserId: mu.id });
            for (const applicationId of applicationIds)
              tx.create(MachineUserApplication, { machineUserId: mu.id, applicationId });
          } else await setScopesIfHeld(tx, MachineUser, mu.id, checked, mu.scopes);
          await tx.flush();
          await assertScopesHold(tx, MachineUser, mu.id, mu.scopes);
          // A disable ends the access tokens issued so far for good, as a user's disable ends
          // its sessions: re-enabling must not bring them back (its credentials stay).
          if (req.disabled === true) {
            cutoff = clock();
            await revokeMachineAccessTokens(tx, mu.id, cutoff, deps.clockSkewSeconds);
          }
        });
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) {
          throw errors.alreadyExists("a machine user with this name exists in the tenant");
        }
        throw err;
      }
      // A token signed while the commit was on its way may bear a later second than the cut-off.
      if (cutoff !== undefined) await raiseRevocationCutoff(e, mu.id, cutoff, clock(), deps.clockSkewSeconds);
      return { machineUser: await toProto(ctx, mu) };
    },

    async deleteMachineUser(req, ctx) {
      const mu = await managedMachineUser(ctx, req.id);
      // Credentials, assignments, certificate bindings and backends cascade. Deleted only
      // if it still holds the scopes checked (not promoted meanwhile).
      if ((await em(ctx).nativeDelete(MachineUser, { id: mu.id, scopes: mu.scopes })) === 0)
        throw principalChanged();
      return {};
    },

    async rotateMachineUserCredentials(req, ctx) {
      const e = em(ctx);
      const mu = await managedMachineUser(ctx, req.id);
      const grace = req.gracePeriodSeconds ?? 0;
      if (!Number.isInteger(grace) || grace < 0 || grace > MAX_GRACE_PERIOD_SECONDS) {
        throw errors.invalidArgument(
          `grace_period_seconds must be between 0 and ${MAX_GRACE_PERIOD_SECONDS}`,
          "grace_period_seconds",
        );
      }
      const now = new Date(clock());
      const graceUntil = new Date(now.getTime() + grace * 1000);
      await countCredentialCreation(deps.limits, principalOf(ctx));
      const credential = await newMachineCredential(mu.id, mu.authType, {
        tokenPrefix: deps.tokenPrefix,
        iterations: deps.passwordIterations,
        now,
      });
      // The new credential is shown once: a lost COMMIT is settled (see commitCreation).
      await commitCreation(
        deps.storage,
        () =>
          e.transactional(async (tx) => {
            // The machine user's row before its credentials' (storage/lock-order.ts), held
            // exclusively: concurrent rotations take turns, in commit order. Each one's
            // statements below see the credentials of those that committed before it, so
            // exactly one credential, the last one's, is left without an end. With a shared
            // lock, two rotations both deleted or ended the credentials they saw before either
            // inserted its own, and both new credentials stayed live.
            if (!(await lockMachineUser(tx, mu.id, "update"))) throw errors.notFound("machine user");
            // The rotation state under that lock: what the write below merges with.
            const seen = await readRotationState(tx, mu.id);
            if (seen === null) throw errors.notFound("machine user");
            // Credentials already past their end are dropped; live ones end now or after the grace period.
            await tx.nativeDelete(MachineCredential, { machineUserId: mu.id, expiresAt: { $lte: now } });
            if (grace === 0) {
              await tx.nativeDelete(MachineCredential, { machineUserId: mu.id });
            } else {
              await tx.nativeUpdate(
                MachineCredential,
                { machineUserId: mu.id, expiresAt: null },
                { expiresAt: graceUntil },
              );
              await tx.nativeUpdate(
                MachineCredential,
                { machineUserId: mu.id, expiresAt: { $gt: graceUntil } },
                { expiresAt: graceUntil },
              );
            }
            tx.create(MachineCredential, credential.row);
            await tx.flush();
            // Access tokens issued before this rotation stop when the previous credentials do.
            // Only the latest rotation is remembered, so if an earlier rotation's (or a
            // revocation's) tokens may still be unexpired, its earlier cut-off is kept: fail
            // closed, never revive them. Merged with the row as read under the lock, so that a
            // revocation or rotation committed since `mu` was read stands (recordRotation).
            await recordRotation(
              tx,
              mu.id,
              seen,
              {
                now,
                graceUntil,
                windowMs: (deps.accessTokenTtlSeconds + deps.clockSkewSeconds) * 1000,
              },
              principalChanged,
            );
            // The new credential carries the scopes the caller was checked against, or nothing.
            await assertScopesHold(tx, MachineUser, mu.id, mu.scopes);
          }),
        { kind: "machine credential", id: credential.row.id },
        async () => (await deps.storage.em.fork().count(MachineCredential, { id: credential.row.id })) > 0,
      );
      // A token the previous credentials obtained meanwhile may bear a later second than `now`.
      await raiseRotationCutoff(e, mu.id, clock());
      // The row as the rotation left it (its own write went around the entity).
      await e.refresh(mu);
      noStore(ctx);
      return {
        machineUser: await toProto(ctx, mu),
        token: credential.token,
        username: credential.username,
        password: credential.password,
        previousCredentialsExpireAt: timestampFromDate(graceUntil),
      };
    },
  };
}
