import type { Command } from "commander";
import { type User, UserSchema } from "../../../gen/tessera/v1/user_service_pb.js";
import { ClientConfigError } from "../../sdk/errors.js";
import { messageJson, when } from "../messages.js";
import { listAll, pageRequest, readPassword, scopeList, withClient } from "./run.js";

// `tessera user …`.

const userRow = (u: User) => [
  u.id,
  u.username,
  u.tenantId,
  u.permissions.join(" ") || "-",
  u.disabled ? "disabled" : "active",
  when(u.createdAt),
];
const USER_HEADERS = ["ID", "USERNAME", "TENANT", "SCOPES", "STATUS", "CREATED"];

/** The actions, by the name client-commands.ts registers them under. */
export const actions = {
  userCreate: async (
    username: string,
    flags: { scopes?: string[]; tenant?: string; passwordStdin?: boolean },
    cmd: Command,
  ) => {
    await withClient(cmd, async ({ api, out }) => {
      const password = await readPassword(flags, `Password for ${username}: `);
      const u = (
        await api.users.createUser({
          username,
          password,
          scopes: scopeList(flags.scopes),
          ...(flags.tenant !== undefined ? { tenantId: flags.tenant } : {}),
        })
      ).user!;
      out.record(messageJson(UserSchema, u), userFields(u));
    });
  },

  userList: (_flags: unknown, cmd: Command) =>
    listAll(cmd, "users", (api, pageToken) => api.users.listUsers(pageRequest(pageToken)), {
      schema: UserSchema,
      headers: USER_HEADERS,
      row: userRow,
    }),

  userGet: async (id: string, _flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const u = (await api.users.getUser({ id })).user!;
      out.record(messageJson(UserSchema, u), userFields(u));
    });
  },

  userUpdate: async (
    id: string,
    flags: { scopes?: string[] | false; revokeTokens?: boolean },
    cmd: Command,
  ) => {
    if (flags.scopes === undefined && !flags.revokeTokens)
      throw new ClientConfigError("nothing to change: give --scopes, --no-scopes or --revoke-tokens");
    await withClient(cmd, async ({ api, out }) => {
      const u = (
        await api.users.updateUser({
          id,
          ...(flags.scopes !== undefined
            ? { scopes: { scopes: flags.scopes === false ? [] : scopeList(flags.scopes) } }
            : {}),
          revokeTokens: flags.revokeTokens ?? false,
        })
      ).user!;
      out.record(messageJson(UserSchema, u), userFields(u));
    });
  },

  userSetDisabled: async (id: string, _flags: unknown, cmd: Command) => {
    const disabled = cmd.name() === "disable";
    await withClient(cmd, async ({ api, out }) => {
      const u = (await api.users.updateUser({ id, disabled })).user!;
      out.message(
        messageJson(UserSchema, u),
        `User ${u.username} (${u.id}) is ${u.disabled ? "disabled" : "enabled"}.`,
      );
    });
  },

  userDelete: async (id: string, _flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      await api.users.deleteUser({ id });
      out.message({ id, deleted: true }, `Deleted user ${id}.`);
    });
  },

  userResetPassword: async (
    id: string,
    flags: { passwordStdin?: boolean; revokeTokens?: boolean },
    cmd: Command,
  ) => {
    await withClient(cmd, async ({ api, out }) => {
      const password = await readPassword(flags, "New password: ");
      const u = (await api.users.updateUser({ id, password, revokeTokens: flags.revokeTokens ?? false }))
        .user!;
      out.message(
        { ...messageJson(UserSchema, u), passwordReset: true },
        `Password of ${u.username} (${u.id}) reset; the user's sessions ended.`,
      );
    });
  },
};

/** A user as "key  value" lines. */
function userFields(u: User): [string, string][] {
  return [
    ["id", u.id],
    ["username", u.username],
    ["tenant", u.tenantId],
    ["scopes", u.permissions.join(" ") || "(none)"],
    ["status", u.disabled ? "disabled" : "active"],
  ];
}
