import type { Command } from "commander";
import {
  CertificateBindingSchema,
  CheckAuthenticationResponseSchema,
  CreateMachineUserResponseSchema,
  MachineAuthType,
  type MachineUser,
  MachineUserSchema,
  MachineUserService,
  RotateMachineUserCredentialsResponseSchema,
} from "../../../gen/tessera/v1/machine_user_service_pb.js";
import { CLIENT_ENV } from "../../sdk/credentials.js";
import { ClientConfigError } from "../../sdk/errors.js";
import type { UserAPIOptions } from "../../sdk/user-api-core.js";
import { messageJson, when } from "../messages.js";
import { readSecretFromStdin } from "../prompt.js";
import {
  listAll,
  pageRequest,
  parseDuration,
  readPassword,
  scopeList,
  showSecret,
  withClient,
} from "./run.js";

// `tessera machine-user …`.

const AUTH_TYPES: Record<string, MachineAuthType> = {
  bearer: MachineAuthType.BEARER,
  basic: MachineAuthType.BASIC,
};

function machineRow(m: MachineUser): string[] {
  const auth = m.authType === MachineAuthType.BASIC ? `basic ${m.username}` : `bearer ${m.tokenHint}`;
  return [
    m.id,
    m.name,
    auth,
    m.scopes.join(" ") || "-",
    m.applicationIds.length ? m.applicationIds.join(" ") : "-",
    m.disabled ? "disabled" : "active",
  ];
}

function machineSecretFields(
  m: MachineUser | undefined,
  res: { token: string; username: string; password: string },
): [string, string][] {
  const fields: [string, string][] = m
    ? [
        ["id", m.id],
        ["name", m.name],
      ]
    : [];
  if (res.token) fields.push(["token", res.token]);
  if (res.username) fields.push(["username", res.username]);
  if (res.password) fields.push(["password", res.password]);
  return fields;
}

/** The actions, by the name client-commands.ts registers them under. */
export const actions = {
  machineUserCreate: async (
    flags: { name: string; authType: string; scopes?: string[]; app?: string[]; tenant?: string },
    cmd: Command,
  ) => {
    await withClient(cmd, async ({ api, out }) => {
      const res = await api.client(MachineUserService).createMachineUser({
        name: flags.name,
        authType: AUTH_TYPES[flags.authType]!,
        scopes: scopeList(flags.scopes),
        applicationIds: flags.app ?? [],
        ...(flags.tenant ? { tenantId: flags.tenant } : {}),
      });
      showSecret(
        out,
        messageJson(CreateMachineUserResponseSchema, res),
        machineSecretFields(res.machineUser, res),
        "credentials",
      );
    });
  },

  machineUserList: (flags: { tenant?: string }, cmd: Command) =>
    listAll(
      cmd,
      "machineUsers",
      (api, pageToken) => api.client(MachineUserService).listMachineUsers(pageRequest(pageToken, flags)),
      {
        schema: MachineUserSchema,
        headers: ["ID", "NAME", "AUTH", "SCOPES", "APPLICATIONS", "STATUS"],
        row: machineRow,
      },
    ),

  machineUserRotate: async (id: string, flags: { gracePeriod?: string }, cmd: Command) => {
    const grace = flags.gracePeriod ? parseDuration(flags.gracePeriod) : undefined;
    await withClient(cmd, async ({ api, out }) => {
      const res = await api.client(MachineUserService).rotateMachineUserCredentials({
        id,
        ...(grace !== undefined ? { gracePeriodSeconds: grace } : {}),
      });
      const fields = machineSecretFields(res.machineUser, res);
      fields.push(["old credentials stop", when(res.previousCredentialsExpireAt)]);
      showSecret(
        out,
        messageJson(RotateMachineUserCredentialsResponseSchema, res),
        fields,
        "new credentials",
      );
    });
  },

  machineUserDelete: async (id: string, _flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      await api.client(MachineUserService).deleteMachineUser({ id });
      out.message({ id, deleted: true }, `Deleted machine user ${id}.`);
    });
  },

  machineUserBindCert: async (id: string, flags: { fingerprint?: string; sanUri?: string }, cmd: Command) => {
    if (Boolean(flags.fingerprint) === Boolean(flags.sanUri))
      throw new ClientConfigError("give exactly one of --fingerprint or --san-uri");
    await withClient(cmd, async ({ api, out }) => {
      const identity = flags.fingerprint
        ? ({ case: "sha256Fingerprint", value: flags.fingerprint } as const)
        : ({ case: "sanUri", value: flags.sanUri! } as const);
      const res = await api.client(MachineUserService).bindCertificate({ machineUserId: id, identity });
      const b = res.binding!;
      out.record(messageJson(CertificateBindingSchema, b), [
        ["binding", b.id],
        [b.sha256Fingerprint ? "fingerprint" : "san uri", b.sha256Fingerprint || b.sanUri],
      ]);
    });
  },

  machineUserCheck: async (
    flags: { tokenStdin?: boolean; username?: string; passwordStdin?: boolean },
    cmd: Command,
  ) => {
    if (flags.tokenStdin && flags.username)
      throw new ClientConfigError("give either --token-stdin or --username, not both");
    // A profile's token belongs to a user, not a machine: only an explicit credential counts.
    const override: Partial<UserAPIOptions> = {
      token: undefined,
      refreshToken: undefined,
      basicAuth: undefined,
    };
    if (flags.tokenStdin) override.token = await readSecretFromStdin();
    else if (flags.username)
      override.basicAuth = { username: flags.username, password: await readPassword(flags) };
    else override.token = process.env[CLIENT_ENV.token] || undefined;
    await withClient(
      cmd,
      async ({ api, out }) => {
        const res = await api.client(MachineUserService).checkAuthentication({});
        out.record(messageJson(CheckAuthenticationResponseSchema, res), [
          ["authenticated", String(res.authenticated)],
          ["machine user", res.machineUserId],
          ["tenant", res.tenantId],
          ["message", res.message],
        ]);
      },
      { requireCredential: false, override },
    );
  },
};
