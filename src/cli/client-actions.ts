import { resolve } from "node:path";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import type { Command } from "commander";
import {
  CertificateBindingSchema,
  CheckAuthenticationResponseSchema,
  CreateMachineUserResponseSchema,
  MachineAuthType,
  type MachineUser,
  MachineUserSchema,
  RotateMachineUserCredentialsResponseSchema,
} from "../../gen/tessera/v1/machine_user_service_pb.js";
import {
  type Application,
  ApplicationSchema,
  type Tenant,
  TenantSchema,
} from "../../gen/tessera/v1/tenant_service_pb.js";
import {
  CreateApiKeyResponseSchema,
  CreatePersonalAccessTokenResponseSchema,
  type TokenMetadata,
  TokenMetadataSchema,
} from "../../gen/tessera/v1/token_service_pb.js";
import { type User, UserSchema } from "../../gen/tessera/v1/user_service_pb.js";
import { CLIENT_ENV, type Profile, readProfile, writeProfile } from "../sdk/credentials.js";
import { type ResolvedClientOptions, resolveClientOptions } from "../sdk/environment.js";
import {
  AlreadyExistsError,
  AuthenticationError,
  ClientConfigError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitedError,
  TesseraClientError,
  UnavailableError,
} from "../sdk/errors.js";
import type { TokenPair } from "../sdk/session.js";
import { UserAPI, type UserAPIOptions } from "../sdk/user-api.js";
import type { ExitCodes } from "./exit-codes.js";
import { messageJson, Output, type OutputFormat, when } from "./output.js";
import { PromptError, promptHidden, readSecretFromStdin } from "./prompt.js";

/** Options every client command accepts (declared once, on the program). */
interface GlobalFlags {
  profile?: string;
  server?: string;
  certFolder?: string;
  caFile?: string;
  protocol?: "grpc" | "connect";
  output: OutputFormat;
}

/**
 * The SDK's option names as the CLI spells them: an SDK message names the option a
 * program passes (`caFile`), a CLI user needs the flag (`--ca-file`).
 */
const FLAG_NAMES: [RegExp, string][] = [
  [/\bcaFile\b/g, "--ca-file"],
  [/\bcertFolder\b/g, "--cert-folder"],
];

/** `message` with the SDK's option names replaced by the CLI flags. */
export function withFlagNames(message: string): string {
  return FLAG_NAMES.reduce((m, [re, flag]) => m.replace(re, flag), message);
}

/**
 * The exit code and message for an error a client command raised, or undefined when
 * it is not a client error. Messages carry the server's reason and request id; they
 * never carry a credential (the SDK guarantees that for its errors).
 */
export function describeClientError(
  err: unknown,
  exit: ExitCodes,
): { code: number; message: string } | undefined {
  if (err instanceof PromptError) return { code: exit.usage, message: err.message };
  if (err instanceof ClientConfigError) return { code: exit.usage, message: withFlagNames(err.message) };
  if (!(err instanceof TesseraClientError)) return undefined;
  const extra = [err.reason, err.requestId ? `request id ${err.requestId}` : undefined]
    .filter(Boolean)
    .join(", ");
  let message = `${withFlagNames(err.message)}${extra ? ` (${extra})` : ""}`;
  let code: number = exit.error;
  if (err instanceof AuthenticationError) {
    code = exit.unauthenticated;
    const sessionOver =
      err.reason === "TOKEN_EXPIRED" || err.reason === "AUTH_REQUIRED" || err.reason === "TOKEN_REVOKED";
    if (sessionOver && !err.message.includes("tessera login")) {
      message += "\nhint: run `tessera login`, or set TESSERA_TOKEN";
    }
  } else if (err instanceof PermissionDeniedError) {
    code = exit.permissionDenied;
    if (err.requiredScopes.length > 0) message += `\nrequired scopes: ${err.requiredScopes.join(" ")}`;
  } else if (err instanceof NotFoundError) code = exit.notFound;
  else if (err instanceof RateLimitedError) {
    code = exit.rateLimited;
    const retryAfter = err.retryAfter ?? err.metadata.get("retry-after") ?? undefined;
    message = `rate limited: ${message}`;
    if (retryAfter !== undefined) message += `\nRetry-After: ${retryAfter}`;
  } else if (err instanceof AlreadyExistsError) code = exit.alreadyExists;
  else if (err instanceof UnavailableError || err.code === Code.DeadlineExceeded) {
    code = exit.unavailable;
    message = `server unavailable: ${message}`;
  } else if (err instanceof InvalidArgumentError) code = exit.usage;
  return { code, message };
}

// ---------------------------------------------------------------------------------
// Plumbing

function globals(cmd: Command): GlobalFlags {
  return cmd.optsWithGlobals() as GlobalFlags;
}

interface ClientRun {
  api: UserAPI;
  out: Output;
  resolved: ResolvedClientOptions;
}

/**
 * Run `fn` with a client built from the flags, the environment and the profile. A
 * session from the profile renews itself and the renewed pair is written back.
 */
export async function withClient(
  cmd: Command,
  fn: (run: ClientRun) => Promise<void>,
  opts: { requireCredential?: boolean; override?: Partial<UserAPIOptions> } = {},
): Promise<void> {
  const flags = globals(cmd);
  const resolved = resolveClientOptions(connectionFlags(flags));
  const options: UserAPIOptions = { ...resolved.options, ...opts.override };
  if (resolved.tokenSource === "profile" && options.refreshToken && !opts.override) {
    options.autoRefresh = true;
    options.onTokens = (pair: TokenPair) => persistPair(resolved, pair);
  }
  if ((opts.requireCredential ?? true) && !options.token && !options.basicAuth) {
    throw new AuthenticationError(
      `not logged in (profile "${resolved.profile}"): run \`tessera login\` or set ${CLIENT_ENV.token}`,
      { code: Code.Unauthenticated, reason: "AUTH_REQUIRED" },
    );
  }
  const api = new UserAPI(options);
  try {
    await fn({ api, out: new Output(flags.output), resolved });
  } finally {
    api.close();
  }
}

/** The connection-related global flags as SDK options. */
function connectionFlags(g: GlobalFlags) {
  return {
    profile: g.profile,
    server: g.server,
    certFolder: g.certFolder,
    caFile: g.caFile,
    protocol: g.protocol,
  };
}

/** Resolution for login/logout: the profile is read (and may be absent); no token is used. */
function sessionConnection(g: GlobalFlags) {
  const resolved = resolveClientOptions(connectionFlags(g), {
    allowMissingProfile: true,
    alwaysReadProfile: true,
  });
  const { token: _t, refreshToken: _r, ...connection } = resolved.options;
  return { resolved, connection };
}

/** Write a renewed session back to the profile it came from. */
function persistPair(resolved: ResolvedClientOptions, pair: TokenPair): void {
  const current = readProfile(resolved.profile, resolved.credentialsFile) ?? {};
  writeProfile(
    resolved.profile,
    { ...current, token: pair.accessToken, refresh_token: pair.refreshToken },
    resolved.credentialsFile,
  );
}

/** Comma- or space-separated scopes, possibly given several times. */
function scopeList(values: string[] | undefined): string[] {
  return (values ?? []).flatMap((v) => v.split(/[\s,]+/)).filter((s) => s.length > 0);
}

const DURATION_RE = /^(\d+)\s*(s|m|h|d|w)?$/;
const UNIT_SECONDS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400, w: 604_800 };

/** Parse "90", "90s", "15m", "12h", "30d", "2w" into seconds. */
export function parseDuration(value: string): number {
  const m = DURATION_RE.exec(value.trim());
  if (!m) throw new ClientConfigError(`invalid duration "${value}": use e.g. 3600, 90m, 12h, 30d`);
  const seconds = Number(m[1]) * UNIT_SECONDS[m[2] ?? "s"]!;
  if (seconds <= 0) throw new ClientConfigError(`invalid duration "${value}": must be positive`);
  return seconds;
}

function expiryFrom(flags: { expiresIn?: string; expiresAt?: string }): Date | undefined {
  if (flags.expiresIn && flags.expiresAt)
    throw new ClientConfigError("give either --expires-in or --expires-at, not both");
  if (flags.expiresIn) return new Date(Date.now() + parseDuration(flags.expiresIn) * 1000);
  if (flags.expiresAt) {
    const d = new Date(flags.expiresAt);
    if (Number.isNaN(d.getTime()))
      throw new ClientConfigError(`invalid --expires-at "${flags.expiresAt}": use an ISO 8601 date`);
    return d;
  }
  return undefined;
}

/** Fetch every page of a paginated list. */
async function allPages<T>(
  fetch: (pageToken: string) => Promise<{ items: T[]; next: string }>,
): Promise<T[]> {
  const items: T[] = [];
  let pageToken = "";
  for (let i = 0; i < 10_000; i++) {
    const page = await fetch(pageToken);
    items.push(...page.items);
    if (!page.next) break;
    pageToken = page.next;
  }
  return items;
}

/** A password from stdin (`--password-stdin`) or a prompt without echo. */
async function readPassword(flags: { passwordStdin?: boolean }, question = "Password: "): Promise<string> {
  return flags.passwordStdin ? readSecretFromStdin() : promptHidden(question);
}

/** Print a secret once, to stdout, with a reminder on stderr. */
function showSecret(
  out: Output,
  json: Record<string, unknown>,
  fields: [string, string][],
  what: string,
): void {
  out.record(json, fields);
  if (!out.json) out.note(`Store the ${what} now: it is shown only once.`);
}

// ---------------------------------------------------------------------------------
// Row helpers

/** Whether a token command is `token` (personal access tokens) rather than `api-key`. */
function isPat(cmd: Command): boolean {
  return cmd.parent?.name() === "token";
}

const tenantRow = (t: Tenant) => [t.id, t.name, t.disabled ? "disabled" : "active", when(t.createdAt)];
const appRow = (a: Application) => [a.id, a.name, a.tenantId, when(a.createdAt)];
const userRow = (u: User) => [
  u.id,
  u.username,
  u.tenantId,
  u.permissions.join(" ") || "-",
  u.disabled ? "disabled" : "active",
  when(u.createdAt),
];
const USER_HEADERS = ["ID", "USERNAME", "TENANT", "SCOPES", "STATUS", "CREATED"];

function tokenRow(t: TokenMetadata): string[] {
  const status = t.revoked
    ? "revoked"
    : t.expiresAt && t.expiresAt.seconds * 1000n < BigInt(Date.now())
      ? "expired"
      : "active";
  return [t.id, t.name, t.hint, t.scopes.join(" ") || "-", when(t.expiresAt), when(t.lastUsedAt), status];
}

const TOKEN_HEADERS = ["ID", "NAME", "HINT", "SCOPES", "EXPIRES", "LAST USED", "STATUS"];

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

// ---------------------------------------------------------------------------------
// Actions

/** The client commands' actions, by the name client-commands.ts registers them under. */
export const actions = {
  login: async (flags: { username: string; tenant?: string; passwordStdin?: boolean }, cmd: Command) => {
    const g = globals(cmd);
    const { resolved, connection } = sessionConnection(g);
    // Configuration problems (a bad cert folder) surface before the password is asked for.
    const api = new UserAPI(connection);
    try {
      const password = await readPassword(flags);
      const result = await api.login(
        flags.username,
        password,
        flags.tenant !== undefined ? { tenant: flags.tenant } : {},
      );
      const server = `${api.host.includes(":") ? `[${api.host}]` : api.host}:${api.port}`;
      const previous: Profile = resolved.profileData ?? {};
      const profile: Profile = {
        ...previous,
        server,
        token: result.accessToken,
        refresh_token: result.refreshToken,
      };
      const certFolder = g.certFolder ?? process.env[CLIENT_ENV.certFolder];
      const caFile = g.caFile ?? process.env[CLIENT_ENV.caFile];
      if (certFolder) profile.cert_folder = resolve(certFolder);
      if (caFile) profile.ca_file = resolve(caFile);
      writeProfile(resolved.profile, profile, resolved.credentialsFile);
      new Output(g.output).message(
        {
          profile: resolved.profile,
          server,
          credentialsFile: resolved.credentialsFile,
          user: result.user,
          accessTokenExpiresAt: result.accessTokenExpiresAt?.toISOString(),
          refreshTokenExpiresAt: result.refreshTokenExpiresAt?.toISOString(),
        },
        `Logged in to ${server} as ${result.user.username} (profile "${resolved.profile}", saved in ${resolved.credentialsFile}).`,
      );
    } finally {
      api.close();
    }
  },

  logout: async (_flags: unknown, cmd: Command) => {
    const g = globals(cmd);
    const { resolved, connection } = sessionConnection(g);
    const out = new Output(g.output);
    const profile = resolved.profileData;
    if (!profile?.token && !profile?.refresh_token) {
      out.message(
        { profile: resolved.profile, loggedOut: false },
        `Not logged in (profile "${resolved.profile}").`,
      );
      return;
    }
    let serverRevoked = false;
    if (profile.refresh_token) {
      const api = new UserAPI(connection);
      try {
        await api.logout(profile.refresh_token);
        serverRevoked = true;
      } catch (err) {
        // The local tokens go regardless; say that the server session may live on.
        out.note(`warning: the server did not end the session: ${(err as Error).message}`);
      } finally {
        api.close();
      }
    }
    const { token: _t, refresh_token: _r, ...rest } = profile;
    writeProfile(resolved.profile, rest, resolved.credentialsFile);
    out.message(
      { profile: resolved.profile, loggedOut: true, serverSessionEnded: serverRevoked },
      `Logged out (profile "${resolved.profile}").`,
    );
  },

  whoami: async (_flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out, resolved }) => {
      const user = await api.getUser();
      const cert = user.clientCertificate;
      out.record(
        {
          id: user.id,
          username: user.username,
          tenantId: user.tenantId,
          permissions: user.permissions,
          createdAt: user.createdAt?.toISOString(),
          clientCertificate: cert,
          server: `${api.host}:${api.port}`,
          profile: resolved.tokenSource === "profile" ? resolved.profile : undefined,
        },
        [
          ["username", user.username],
          ["id", user.id],
          ["tenant", user.tenantId],
          ["permissions", user.permissions.join(" ") || "(none)"],
          ["server", `${api.host}:${api.port}`],
          ...(cert
            ? ([["certificate", `${cert.commonName || "(no CN)"} sha256:${cert.sha256Fingerprint}`]] as [
                string,
                string,
              ][])
            : []),
        ],
      );
    });
  },

  tokenCreate: async (
    flags: { name: string; scopes?: string[]; expiresIn?: string; expiresAt?: string },
    cmd: Command,
  ) => {
    const pat = isPat(cmd);
    const expires = expiryFrom(flags);
    await withClient(cmd, async ({ api, out }) => {
      const req = {
        name: flags.name,
        scopes: scopeList(flags.scopes),
        ...(expires ? { expiresAt: timestampFromDate(expires) } : {}),
      };
      if (pat) {
        const res = await api.tokens.createPersonalAccessToken(req);
        const json = messageJson(CreatePersonalAccessTokenResponseSchema, res);
        showSecret(
          out,
          json,
          [
            ["id", res.id],
            ["name", res.name],
            ["scopes", res.scopes.join(" ")],
            ["expires", when(res.expiresAt)],
            ["token", res.token],
          ],
          "token",
        );
      } else {
        const res = await api.tokens.createApiKey(req);
        showSecret(
          out,
          messageJson(CreateApiKeyResponseSchema, res),
          [
            ["id", res.id],
            ["name", res.name],
            ["scopes", res.scopes.join(" ")],
            ["expires", when(res.expiresAt)],
            ["key", res.key],
          ],
          "API key",
        );
      }
    });
  },

  tokenList: async (flags: { user?: string; allUsers?: boolean; includeRevoked?: boolean }, cmd: Command) => {
    const pat = isPat(cmd);
    await withClient(cmd, async ({ api, out }) => {
      const base = {
        userId: flags.user ?? "",
        allUsers: flags.allUsers ?? false,
        includeRevoked: flags.includeRevoked ?? false,
        pageSize: 200,
      };
      const items = await allPages(async (pageToken) => {
        if (pat) {
          const res = await api.tokens.listPersonalAccessTokens({ ...base, pageToken });
          return { items: res.tokens, next: res.nextPageToken };
        }
        const res = await api.tokens.listApiKeys({ ...base, pageToken });
        return { items: res.apiKeys, next: res.nextPageToken };
      });
      const json = items.map((t) => messageJson(TokenMetadataSchema, t));
      out.list(pat ? { tokens: json } : { apiKeys: json }, TOKEN_HEADERS, items.map(tokenRow));
    });
  },

  tokenRevoke: async (id: string, _flags: unknown, cmd: Command) => {
    const pat = isPat(cmd);
    const noun = pat ? "personal access token" : "API key";
    await withClient(cmd, async ({ api, out }) => {
      const meta = pat
        ? (await api.tokens.revokePersonalAccessToken({ id })).token
        : (await api.tokens.revokeApiKey({ id })).apiKey;
      out.message(
        meta ? messageJson(TokenMetadataSchema, meta) : { id, revoked: true },
        `Revoked ${noun} ${id}${meta ? ` (${meta.name})` : ""}.`,
      );
    });
  },

  machineUserCreate: async (
    flags: { name: string; authType: string; scopes?: string[]; app?: string[]; tenant?: string },
    cmd: Command,
  ) => {
    await withClient(cmd, async ({ api, out }) => {
      const res = await api.machineUsers.createMachineUser({
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

  machineUserList: async (flags: { tenant?: string }, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const items = await allPages(async (pageToken) => {
        const res = await api.machineUsers.listMachineUsers({
          pageSize: 200,
          pageToken,
          ...(flags.tenant ? { tenantId: flags.tenant } : {}),
        });
        return { items: res.machineUsers, next: res.nextPageToken };
      });
      out.list(
        { machineUsers: items.map((m) => messageJson(MachineUserSchema, m)) },
        ["ID", "NAME", "AUTH", "SCOPES", "APPLICATIONS", "STATUS"],
        items.map(machineRow),
      );
    });
  },

  machineUserRotate: async (id: string, flags: { gracePeriod?: string }, cmd: Command) => {
    const grace = flags.gracePeriod ? parseDuration(flags.gracePeriod) : undefined;
    await withClient(cmd, async ({ api, out }) => {
      const res = await api.machineUsers.rotateMachineUserCredentials({
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
      await api.machineUsers.deleteMachineUser({ id });
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
      const res = await api.machineUsers.bindCertificate({ machineUserId: id, identity });
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
        const res = await api.machineUsers.checkAuthentication({});
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

  tenantCreate: async (name: string, _flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const t = (await api.tenants.createTenant({ name })).tenant!;
      out.record(messageJson(TenantSchema, t), [
        ["id", t.id],
        ["name", t.name],
      ]);
    });
  },

  tenantList: async (_flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const items = await allPages(async (pageToken) => {
        const res = await api.tenants.listTenants({ pageSize: 200, pageToken });
        return { items: res.tenants, next: res.nextPageToken };
      });
      out.list(
        { tenants: items.map((t) => messageJson(TenantSchema, t)) },
        ["ID", "NAME", "STATUS", "CREATED"],
        items.map(tenantRow),
      );
    });
  },

  tenantSetDisabled: async (id: string, _flags: unknown, cmd: Command) => {
    const disabled = cmd.name() === "disable";
    await withClient(cmd, async ({ api, out }) => {
      const t = (await api.tenants.updateTenant({ id, disabled })).tenant!;
      out.message(
        messageJson(TenantSchema, t),
        `Tenant ${t.name} (${t.id}) is ${t.disabled ? "disabled" : "enabled"}.`,
      );
    });
  },

  appCreate: async (name: string, flags: { tenant?: string }, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const a = (
        await api.tenants.createApplication({ name, ...(flags.tenant ? { tenantId: flags.tenant } : {}) })
      ).application!;
      out.record(messageJson(ApplicationSchema, a), [
        ["id", a.id],
        ["name", a.name],
        ["tenant", a.tenantId],
      ]);
    });
  },

  appList: async (flags: { tenant?: string }, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const items = await allPages(async (pageToken) => {
        const res = await api.tenants.listApplications({
          pageSize: 200,
          pageToken,
          ...(flags.tenant ? { tenantId: flags.tenant } : {}),
        });
        return { items: res.applications, next: res.nextPageToken };
      });
      out.list(
        { applications: items.map((a) => messageJson(ApplicationSchema, a)) },
        ["ID", "NAME", "TENANT", "CREATED"],
        items.map(appRow),
      );
    });
  },

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

  userList: async (_flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out }) => {
      const items = await allPages(async (pageToken) => {
        const res = await api.users.listUsers({ pageSize: 200, pageToken });
        return { items: res.users, next: res.nextPageToken };
      });
      out.list({ users: items.map((u) => messageJson(UserSchema, u)) }, USER_HEADERS, items.map(userRow));
    });
  },

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
