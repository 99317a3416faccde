import type { Command } from "commander";
import {
  type Application,
  ApplicationSchema,
  type Tenant,
  TenantSchema,
  TenantService,
} from "../../../gen/tessera/v1/tenant_service_pb.js";
import { messageJson, when } from "../messages.js";
import { listAll, pageRequest, withClient } from "./run.js";

// `tessera tenant …` and `tessera app …`.

const tenantRow = (t: Tenant) => [t.id, t.name, t.disabled ? "disabled" : "active", when(t.createdAt)];
const appRow = (a: Application) => [a.id, a.name, a.tenantId, when(a.createdAt)];

/** The actions, by the name client-commands.ts registers them under. */
export const actions = {
  tenantCreate: async (name: string, _flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const t = (await api.client(TenantService).createTenant({ name })).tenant!;
      out.record(messageJson(TenantSchema, t), [
        ["id", t.id],
        ["name", t.name],
      ]);
    });
  },

  tenantList: (_flags: unknown, cmd: Command) =>
    listAll(
      cmd,
      "tenants",
      (api, pageToken) => api.client(TenantService).listTenants(pageRequest(pageToken)),
      {
        schema: TenantSchema,
        headers: ["ID", "NAME", "STATUS", "CREATED"],
        row: tenantRow,
      },
    ),

  tenantSetDisabled: async (id: string, _flags: unknown, cmd: Command) => {
    const disabled = cmd.name() === "disable";
    await withClient(cmd, async ({ api, out }) => {
      const t = (await api.client(TenantService).updateTenant({ id, disabled })).tenant!;
      out.message(
        messageJson(TenantSchema, t),
        `Tenant ${t.name} (${t.id}) is ${t.disabled ? "disabled" : "enabled"}.`,
      );
    });
  },

  appCreate: async (name: string, flags: { tenant?: string }, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const a = (
        await api
          .client(TenantService)
          .createApplication({ name, ...(flags.tenant ? { tenantId: flags.tenant } : {}) })
      ).application!;
      out.record(messageJson(ApplicationSchema, a), [
        ["id", a.id],
        ["name", a.name],
        ["tenant", a.tenantId],
      ]);
    });
  },

  appList: (flags: { tenant?: string }, cmd: Command) =>
    listAll(
      cmd,
      "applications",
      (api, pageToken) => api.client(TenantService).listApplications(pageRequest(pageToken, flags)),
      { schema: ApplicationSchema, headers: ["ID", "NAME", "TENANT", "CREATED"], row: appRow },
    ),
};
