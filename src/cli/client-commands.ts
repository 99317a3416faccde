import { type Command, InvalidArgumentError as CommanderArgumentError, Option } from "commander";
import { CLIENT_ENV } from "../sdk/client-env.js";

/**
 * The client commands' tree: names, flags and help. It imports only commander, so that
 * `tessera --help` and the parsing of every command load nothing else; each action loads
 * its command group's module under actions/ (the SDK core, its service's generated
 * descriptors, the output helpers) when it runs.
 */

/** The client environment variables: the SDK's module of them imports nothing, so `--help` loads no more. */
const ENV = CLIENT_ENV;

/**
 * Each command group's actions, a module of their own: a command loads its group's only
 * (with its service's generated descriptors), or the bundle's chunk of it when built
 * (scripts/bundle-cli.ts turns each of these imports into a chunk).
 */
const GROUPS = {
  session: () => import("./actions/session.js"),
  // whoami's own call, without the SDK client (which it loads for a profile's session).
  whoami: () => import("./actions/whoami.js").then((m) => ({ actions: { whoami: m.whoami } })),
  users: () => import("./actions/users.js"),
  tokens: () => import("./actions/tokens.js"),
  machineUsers: () => import("./actions/machine-users.js"),
  tenants: () => import("./actions/tenants.js"),
};
type Groups = typeof GROUPS;

type Action = (...args: unknown[]) => Promise<void>;

/** An action of `group` that loads its implementation when it runs. */
function lazy<G extends keyof Groups>(
  group: G,
  name: keyof Awaited<ReturnType<Groups[G]>>["actions"],
): Action {
  return async (...args) => {
    const { actions } = (await GROUPS[group]()) as { actions: Record<PropertyKey, unknown> };
    await (actions[name] as (...a: unknown[]) => Promise<void>)(...args);
  };
}

/**
 * Parser for an id (or a name standing for one) given as an argument or flag: an empty or
 * blank value, or one with whitespace or control characters, is a usage error rather than
 * "unset" (an empty `--tenant ""` once fell back to the default tenant).
 */
export function idValue(what: string) {
  return (value: string): string => {
    if (value.trim() === "") throw new CommanderArgumentError(`${what} must not be empty`);
    // biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
    if (/[\s\u0000-\u001f\u007f]/.test(value))
      throw new CommanderArgumentError(`${what} "${value}" is malformed: no spaces or control characters`);
    return value;
  };
}

/** A non-empty text value (a name, a username). */
function textValue(what: string) {
  return (value: string): string => {
    if (value.trim() === "") throw new CommanderArgumentError(`${what} must not be empty`);
    return value;
  };
}

/** `parent <name> <id>`: a subcommand acting on one `what` named by its id. */
function onId(parent: Command, name: string, what: string, description: string): Command {
  return parent
    .command(name)
    .description(description)
    .argument("<id>", `${what} id`, idValue(`${what} id`));
}

/** `parent create <name>`: a subcommand creating a `what` of that name. */
function creating(parent: Command, what: string, description: string): Command {
  return parent
    .command("create")
    .description(description)
    .argument("<name>", `${what} name`, textValue(`${what} name`));
}

/** `disable <id>` and `enable <id>` of `what`, both running `action` (which tells them apart by name). */
function disableEnable(parent: Command, what: string, disable: string, enable: string, action: Action): void {
  onId(parent, "disable", what, disable).action(action);
  onId(parent, "enable", what, enable).action(action);
}

/** `--tenant <id>`, with its help. */
export function tenantOption(help: string): Option {
  return new Option("--tenant <id>", help).argParser(idValue("--tenant"));
}

/** `parent list [--tenant <id>]`: a list that one tenant's id narrows. */
function tenantList(parent: Command, description: string, action: Action): void {
  parent
    .command("list")
    .description(description)
    .addOption(tenantOption("only this tenant's"))
    .action(action);
}

/** Repeatable flags collect their values. */
function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

const HELP_AFTER = `
Client commands find the server and credentials in this order: the options above, then
the environment (${ENV.server}=host:port, ${ENV.token}, ${ENV.certFolder}, ${ENV.caFile}),
then the profile (--profile or ${ENV.profile}, default "default") of ~/.tessera/credentials,
which \`tessera login\` writes with mode 0600 and which is refused if group or others can read it.
Secrets (created tokens, machine-user passwords) are printed once, to stdout only.`;

/** Register login, logout, whoami, user, token, api-key, machine-user, tenant and app on the program. */
export function registerClientCommands(program: Command): void {
  program
    .option("--profile <name>", `credentials profile (env: ${ENV.profile}; default "default")`)
    .option("--server <host:port>", `server address (env: ${ENV.server}; default localhost:50052)`)
    .option(
      "--cert-folder <dir>",
      `folder with ca.crt, and client.crt + client.key for mTLS (env: ${ENV.certFolder})`,
    )
    .option("--ca-file <file>", `CA bundle to verify the server (env: ${ENV.caFile}; default: system roots)`)
    .addOption(
      new Option("--protocol <protocol>", "wire protocol of client commands")
        .choices(["grpc", "connect"])
        .default("grpc"),
    )
    .addOption(
      new Option("--output <format>", "output of client commands")
        .choices(["table", "json"])
        .default("table"),
    )
    .addHelpText("after", HELP_AFTER);

  registerSessionCommands(program);
  registerUserCommands(program);
  registerTokenCommands(program, "token");
  registerTokenCommands(program, "api-key");
  registerMachineUserCommands(program);
  registerTenantCommands(program);
}

// ---------------------------------------------------------------------------------
// login, logout, whoami

function registerSessionCommands(program: Command): void {
  program
    .command("login")
    .description("log in with a username and password and store the session in the credentials profile")
    .requiredOption("-u, --username <username>", "username", textValue("--username"))
    .option(
      "--tenant <tenant>",
      "the user's tenant (name or id); needed for users outside the default tenant",
      idValue("--tenant"),
    )
    .option("--password-stdin", "read the password from stdin instead of prompting")
    .action(lazy("session", "login"));

  program
    .command("logout")
    .description("end the profile's session on the server and remove its tokens from the profile")
    .action(lazy("session", "logout"));

  program
    .command("whoami")
    .description(
      "show who the current credentials belong to and their permissions (any token: a session, a personal access token, an API key, the admin token)",
    )
    .action(lazy("whoami", "whoami"));
}

// ---------------------------------------------------------------------------------
// user

function registerUserCommands(program: Command): void {
  const user = program
    .command("user")
    .description("users of a tenant (needs admin:users; you manage only users whose scopes you hold)");

  user
    .command("create")
    .description("create a user holding at most your scopes (password prompted or --password-stdin)")
    .argument("<username>", "username, unique within the tenant", textValue("username"))
    .option("-s, --scopes <scopes>", "scopes, comma-separated (repeatable; default: none)", collect)
    .addOption(tenantOption("tenant (default: yours; another needs *)"))
    .option("--password-stdin", "read the password from stdin instead of prompting")
    .action(lazy("users", "userCreate"));

  user.command("list").description("list the users of your tenant").action(lazy("users", "userList"));

  onId(user, "get", "user", "show a user").action(lazy("users", "userGet"));

  onId(user, "update", "user", "change a user's scopes")
    .option("-s, --scopes <scopes>", "the new scopes, comma-separated (repeatable)", collect)
    .option("--no-scopes", "remove every scope")
    .option("--revoke-tokens", "also revoke the user's tokens and sessions")
    .action(lazy("users", "userUpdate"));

  disableEnable(
    user,
    "user",
    "disable a user: its sessions, tokens and logins are refused",
    "re-enable a disabled user",
    lazy("users", "userSetDisabled"),
  );

  onId(user, "delete", "user", "delete a user with its sessions and tokens").action(
    lazy("users", "userDelete"),
  );

  onId(
    user,
    "reset-password",
    "user",
    "set a user's password (prompted or --password-stdin); ends the user's sessions",
  )
    .option("--password-stdin", "read the new password from stdin instead of prompting")
    .option("--revoke-tokens", "also revoke the user's personal access tokens and API keys")
    .action(lazy("users", "userResetPassword"));
}

// ---------------------------------------------------------------------------------
// token / api-key

function registerTokenCommands(program: Command, kind: "token" | "api-key"): void {
  const pat = kind === "token";
  const noun = pat ? "personal access token" : "API key";
  const aNoun = pat ? "a personal access token" : "an API key";
  const group = program
    .command(kind)
    .description(pat ? "personal access tokens (CLI tools, scripts)" : "API keys (integrations)");

  group
    .command("create")
    .description(`create ${aNoun} acting as you; it is printed once`)
    .requiredOption("-n, --name <name>", `name of the ${noun}, e.g. "CI"`, textValue("--name"))
    .option("-s, --scopes <scopes>", "scopes, comma-separated (repeatable; default: all of yours)", collect)
    .option("--expires-in <duration>", "lifetime, e.g. 30d, 12h (default: no expiry)")
    .option("--expires-at <date>", "expiry as an ISO 8601 date")
    .action(lazy("tokens", "tokenCreate"));

  group
    .command("list")
    .description(`list ${noun}s (yours by default; never their secrets)`)
    .option("--user <id>", "another user's (needs admin:tokens)", idValue("--user"))
    .option("--all-users", "every user's in your tenant (needs admin:tokens)")
    .option("--include-revoked", "include revoked ones")
    .action(lazy("tokens", "tokenList"));

  onId(group, "revoke", noun, `revoke ${aNoun}; it is refused from the next request on`).action(
    lazy("tokens", "tokenRevoke"),
  );
}

// ---------------------------------------------------------------------------------
// machine-user

function registerMachineUserCommands(program: Command): void {
  const group = program.command("machine-user").description("machine users: service-to-service principals");

  group
    .command("create")
    .description("create a machine user; its credentials are printed once")
    .requiredOption("-n, --name <name>", "name, unique within the tenant", textValue("--name"))
    .addOption(
      new Option("--auth-type <type>", "how it authenticates").choices(["bearer", "basic"]).default("bearer"),
    )
    .option("-s, --scopes <scopes>", "scopes, comma-separated (repeatable); you must hold each", collect)
    .option(
      "--app <id>",
      "application it may register backends for (repeatable)",
      (v: string, p?: string[]) => collect(idValue("--app")(v), p),
    )
    .addOption(tenantOption("tenant (default: yours; another needs *)"))
    .action(lazy("machineUsers", "machineUserCreate"));

  tenantList(group, "list machine users", lazy("machineUsers", "machineUserList"));

  onId(
    group,
    "rotate",
    "machine user",
    "issue new credentials (printed once); the old ones stop now or after --grace-period",
  )
    .option("--grace-period <duration>", "how long the old credentials keep working, e.g. 1h (max 30d)")
    .action(lazy("machineUsers", "machineUserRotate"));

  onId(
    group,
    "delete",
    "machine user",
    "delete a machine user with its credentials, certificate bindings and backends",
  ).action(lazy("machineUsers", "machineUserDelete"));

  onId(
    group,
    "bind-cert",
    "machine user",
    "let a client certificate alone (mTLS, no header) authenticate as this machine user",
  )
    .option("--fingerprint <sha256>", "SHA-256 fingerprint of the certificate (hex; colons and case ignored)")
    .option(
      "--san-uri <uri>",
      "a URI SAN every certificate of the machine user carries, e.g. spiffe://example.org/backend",
    )
    .action(lazy("machineUsers", "machineUserBindCert"));

  group
    .command("check")
    .description(
      `check machine credentials (CheckAuthentication): a token from --token-stdin or ${ENV.token}, ` +
        "Basic with --username, or the client certificate of --cert-folder alone",
    )
    .option("--token-stdin", "read the machine token from stdin")
    .option(
      "-u, --username <username>",
      "Basic credentials: the machine user's username (password prompted or --password-stdin)",
      textValue("--username"),
    )
    .option("--password-stdin", "read the Basic password from stdin")
    .action(lazy("machineUsers", "machineUserCheck"));
}

// ---------------------------------------------------------------------------------
// tenant / app

function registerTenantCommands(program: Command): void {
  const tenant = program.command("tenant").description("tenants (needs admin:tenants)");

  creating(tenant, "tenant", "create a tenant (needs *)").action(lazy("tenants", "tenantCreate"));

  tenant.command("list").description("list the tenants you can see").action(lazy("tenants", "tenantList"));

  disableEnable(
    tenant,
    "tenant",
    "disable a tenant: its users, machine users and tokens are refused",
    "re-enable a tenant",
    lazy("tenants", "tenantSetDisabled"),
  );

  const app = program.command("app").description("applications within a tenant (needs admin:tenants)");

  creating(app, "application", "create an application")
    .addOption(tenantOption("tenant (default: yours)"))
    .action(lazy("tenants", "appCreate"));

  tenantList(app, "list applications", lazy("tenants", "appList"));
}
