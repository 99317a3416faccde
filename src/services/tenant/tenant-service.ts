import { randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { LockMode, UniqueConstraintViolationException } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/knex";
import type {
  ApplicationSchema,
  TenantSchema,
  TenantService,
} from "../../../gen/tessera/v1/tenant_service_pb.js";
import { auditTarget } from "../../admission/audit.js";
import { assertMayManage } from "../../auth/authority.js";
import { isSuperuser } from "../../auth/principal.js";
import { parseScopeString } from "../../auth/scopes.js";
import { requestState } from "../../context.js";
import { errors, TesseraError } from "../../errors.js";
import { Tenant } from "../../storage/entities.js";
import { Application, Backend, MachineUser, MachineUserApplication } from "../../storage/machine-entities.js";
import type { Storage } from "../../storage/orm.js";
import { requestEms } from "../../storage/request-em.js";
import {
  assertId,
  findReachable,
  principalChanged,
  principalOf,
  reachesTenant,
  tenantWhere,
} from "../common.js";
import { listRequest } from "../pagination.js";
import { assertDisplayName } from "./names.js";

/** Dependencies of the TenantService implementation. */
export interface TenantServiceDeps {
  storage: Storage;
  /** The tenant of principals that have none (the static admin token). */
  defaultTenantId: () => Promise<string>;
}

/** The wire shape of a tenant. */
export function tenantToProto(tenant: Tenant): MessageInitShape<typeof TenantSchema> {
  return {
    id: tenant.id,
    name: tenant.name,
    disabled: tenant.disabled,
    createdAt: timestampFromDate(tenant.createdAt),
    updatedAt: timestampFromDate(tenant.updatedAt),
  };
}

/** The wire shape of an application. */
export function applicationToProto(app: Application): MessageInitShape<typeof ApplicationSchema> {
  return { id: app.id, tenantId: app.tenantId, name: app.name, createdAt: timestampFromDate(app.createdAt) };
}

/**
 * A tenant visible to the caller, or NotFound: another tenant reads exactly like a
 * missing one (same reason, same message).
 */
export async function visibleTenant(
  ctx: HandlerContext,
  em: EntityManager,
  id: string,
  field = "id",
): Promise<Tenant> {
  assertId(id, "tenant", field);
  if (!reachesTenant(ctx, id)) throw errors.notFound("tenant");
  const tenant = await em.findOne(Tenant, { id });
  if (!tenant) throw errors.notFound("tenant");
  return tenant;
}

/**
 * The tenant a create request acts in: the named one (which must be visible), else the
 * caller's own, else (static admin token) the default tenant.
 */
export async function targetTenantId(
  ctx: HandlerContext,
  em: EntityManager,
  requested: string | undefined,
  defaultTenantId: () => Promise<string>,
): Promise<string> {
  if (requested !== undefined) return (await visibleTenant(ctx, em, requested, "tenant_id")).id;
  return principalOf(ctx).tenantId ?? (await defaultTenantId());
}

/**
 * TenantService. Superusers (`*`) see every tenant; other holders of `admin:tenants`
 * see and manage only their own tenant and its applications. Creating a tenant needs `*`.
 */
export function createTenantService(deps: TenantServiceDeps): ServiceImpl<typeof TenantService> {
  const em = requestEms(deps.storage.em);

  async function visibleApplication(ctx: HandlerContext, id: string): Promise<Application> {
    assertId(id, "application");
    const app = await findReachable(ctx, em(ctx), Application, id);
    if (!app) throw errors.notFound("application");
    return app;
  }

  async function flushUnique(ctx: HandlerContext, message: string): Promise<void> {
    try {
      await em(ctx).flush();
    } catch (err) {
      if (err instanceof UniqueConstraintViolationException) throw errors.alreadyExists(message);
      throw err;
    }
  }

  return {
    async createTenant(req, ctx) {
      const principal = principalOf(ctx);
      if (!isSuperuser(principal))
        throw new TesseraError("ACCESS_DENIED", "only a principal holding * may create tenants");
      assertDisplayName(req.name);
      if (await em(ctx).count(Tenant, { name: req.name }))
        throw errors.alreadyExists("a tenant with this name exists");
      const now = new Date();
      const tenant = em(ctx).create(Tenant, {
        id: randomUUID(),
        name: req.name,
        disabled: false,
        createdAt: now,
        updatedAt: now,
      });
      await flushUnique(ctx, "a tenant with this name exists");
      // A new tenant is the platform's act, on no tenant yet: only `*` readers see it.
      auditTarget(requestState(ctx.values), { id: tenant.id, tenantId: null });
      return { tenant: tenantToProto(tenant) };
    },

    async getTenant(req, ctx) {
      return { tenant: tenantToProto(await visibleTenant(ctx, em(ctx), req.id)) };
    },

    async listTenants(req, ctx) {
      const { items, ...page } = await listRequest(em(ctx), Tenant, req, tenantWhere(principalOf(ctx), "id"));
      return { tenants: items.map(tenantToProto), ...page };
    },

    async updateTenant(req, ctx) {
      const principal = principalOf(ctx);
      const tenant = await visibleTenant(ctx, em(ctx), req.id);
      // Tenant names are one namespace across the platform (like creating a tenant): a
      // tenant admin renaming its own tenant could probe other tenants' names by the
      // uniqueness refusal. Refused before the name is looked at, taken or not.
      if (req.name !== undefined && !isSuperuser(principal))
        throw new TesseraError("ACCESS_DENIED", "only a principal holding * may rename a tenant");
      if (req.name !== undefined && req.name !== tenant.name) {
        assertDisplayName(req.name);
        if (await em(ctx).count(Tenant, { name: req.name }))
          throw errors.alreadyExists("a tenant with this name exists");
        tenant.name = req.name;
      }
      if (req.disabled !== undefined) {
        if (req.disabled && principal.tenantId === tenant.id) {
          throw new TesseraError("FAILED_PRECONDITION", "you cannot disable your own tenant");
        }
        // Disabling (or enabling) a tenant changes every principal in it, and a tenant may
        // hold a `*` user: only a `*` caller has authority over all of them. (Only `*` sees
        // another tenant anyway; this keeps it so if visibility ever widens.)
        if (!isSuperuser(principal))
          throw new TesseraError(
            "ACCESS_DENIED",
            "only a principal holding * may disable or enable a tenant",
          );
        tenant.disabled = req.disabled;
      }
      tenant.updatedAt = new Date();
      await flushUnique(ctx, "a tenant with this name exists");
      return { tenant: tenantToProto(tenant) };
    },

    async createApplication(req, ctx) {
      const tenantId = await targetTenantId(ctx, em(ctx), req.tenantId, deps.defaultTenantId);
      assertDisplayName(req.name);
      if (await em(ctx).count(Application, { tenantId, name: req.name })) {
        throw errors.alreadyExists("an application with this name exists in the tenant");
      }
      const app = em(ctx).create(Application, {
        id: randomUUID(),
        tenantId,
        name: req.name,
        createdAt: new Date(),
      });
      await flushUnique(ctx, "an application with this name exists in the tenant");
      auditTarget(requestState(ctx.values), { id: app.id, tenantId });
      return { application: applicationToProto(app) };
    },

    async getApplication(req, ctx) {
      return { application: applicationToProto(await visibleApplication(ctx, req.id)) };
    },

    async listApplications(req, ctx) {
      const { items, ...page } = await listRequest(em(ctx), Application, req, async () =>
        req.tenantId !== undefined
          ? { tenantId: (await visibleTenant(ctx, em(ctx), req.tenantId, "tenant_id")).id }
          : tenantWhere(principalOf(ctx), "tenantId"),
      );
      return { applications: items.map(applicationToProto), ...page };
    },

    async deleteApplication(req, ctx) {
      const app = await visibleApplication(ctx, req.id);
      const principal = principalOf(ctx);
      // Assignments and registered backends go with it (ON DELETE CASCADE): that changes
      // every machine user assigned to it or registered on it, so the caller needs
      // authority over each of them (assertMayManage). Checked first without locks (a
      // refusal costs no transaction), then again on the locked rows.
      assertMayManage(principal, { scopes: await affectedScopes(em(ctx), app.id, false) });
      await em(ctx).transactional(async (tx) => {
        // The application's row locked (first: storage/lock-order.ts): an assignment or
        // backend being added to it (its foreign key check takes a KEY SHARE lock on this
        // row) committed before and is read below, or waits for this delete and fails. Its
        // machine users are locked against a promotion, its backends against a take-over,
        // until the commit. (SQLite runs one transaction at a time: the locks are no-ops there.)
        if (!(await tx.findOne(Application, { id: app.id }, { lockMode: LockMode.PESSIMISTIC_WRITE })))
          return;
        const scopes = await affectedScopes(tx, app.id, true);
        try {
          assertMayManage(principal, { scopes });
        } catch {
          // Authority held on the rows as first read: a principal changed meanwhile.
          throw principalChanged();
        }
        await tx.nativeDelete(Application, { id: app.id });
      });
      return {};
    },
  };
}

/**
 * The scopes of the machine users an application's deletion changes (assigned to it, or
 * owning a backend on it), read again from the database. `lock` (in a transaction holding the
 * application's row FOR UPDATE): those machine users FOR SHARE, then its backends FOR
 * UPDATE, in the lock order of storage/lock-order.ts (a DeleteMachineUser holds the machine
 * user, then its backends); a backend taken over meanwhile by a machine user not locked is
 * a principal changed.
 */
async function affectedScopes(e: EntityManager, applicationId: string, lock: boolean): Promise<string[]> {
  const ids = new Set<string>();
  for (const a of await e.find(MachineUserApplication, { applicationId }, { refresh: true }))
    ids.add(a.machineUserId);
  for (const b of await e.find(Backend, { applicationId }, { refresh: true })) ids.add(b.machineUserId);
  const users =
    ids.size === 0
      ? []
      : await e.find(
          MachineUser,
          { id: { $in: [...ids] } },
          lock
            ? { refresh: true, orderBy: { id: "asc" }, lockMode: LockMode.PESSIMISTIC_READ }
            : { refresh: true },
        );
  if (lock) {
    const backends = await e.find(
      Backend,
      { applicationId },
      { refresh: true, orderBy: { id: "asc" }, lockMode: LockMode.PESSIMISTIC_WRITE },
    );
    if (backends.some((b) => !ids.has(b.machineUserId))) throw principalChanged();
  }
  return users.flatMap((m) => parseScopeString(m.scopes));
}
