import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import type { Command } from "commander";
import { CLIENT_ENV, readProfile, writeProfile } from "../../sdk/credentials.js";
import { type ResolvedClientOptions, resolveClientOptions } from "../../sdk/environment.js";
import { AuthenticationError, ClientConfigError } from "../../sdk/errors.js";
import type { TokenPair } from "../../sdk/session.js";
import { UserAPICore, type UserAPIOptions } from "../../sdk/user-api-core.js";
import { messageJson } from "../messages.js";
import { Output } from "../output.js";
import { promptHidden, readSecretFromStdin } from "../prompt.js";
import { connectionFlags, type GlobalFlags, globals } from "./flags.js";
import { readPages } from "./pages.js";

// What every client command's action shares: the flags, the client, pages, secrets.
// Each command group's actions are a module of their own in this folder, loaded when one
// of its commands runs (client-commands.ts), so that a command loads the generated
// descriptors of its own service only.

export { type GlobalFlags, globals };

/** What {@link withClient} hands an action. */
export interface ClientRun {
  api: UserAPICore;
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
    if (resolved.profileElsewhere !== undefined)
      throw new AuthenticationError(
        `profile "${resolved.profile}" is logged in to ${resolved.profileElsewhere}, not to ${options.host}:${options.port}: ` +
          `its tokens are not sent to another server; run \`tessera login\` there or set ${CLIENT_ENV.token}`,
        { code: Code.Unauthenticated, reason: "AUTH_REQUIRED" },
      );
    throw new AuthenticationError(
      `not logged in (profile "${resolved.profile}"): run \`tessera login\` or set ${CLIENT_ENV.token}`,
      { code: Code.Unauthenticated, reason: "AUTH_REQUIRED" },
    );
  }
  const api = new UserAPICore(options);
  try {
    await fn({ api, out: new Output(flags.output), resolved });
  } finally {
    api.close();
  }
}

/** Resolution for login/logout: the profile is read (and may be absent); no token is used. */
export function sessionConnection(g: GlobalFlags) {
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
export function scopeList(values: string[] | undefined): string[] {
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

export function expiryFrom(flags: { expiresIn?: string; expiresAt?: string }): Date | undefined {
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

/** A list page's request: 200 rows (the most a page holds), narrowed to `--tenant` when given. */
export function pageRequest(pageToken: string, flags: { tenant?: string } = {}) {
  return { pageSize: 200, pageToken, ...(flags.tenant ? { tenantId: flags.tenant } : {}) };
}

/** How a list command prints its items: as their messages' JSON, or a table of these headers and a row per item. */
export interface ListTable<D extends DescMessage> {
  schema: D;
  headers: string[];
  row: (item: MessageShape<D>) => string[];
}

/**
 * A list command's action: every page that `page` reads (a List RPC whose items are the
 * response's field `key`), printed as `table` says, under `key` in JSON.
 */
export async function listAll<K extends string, D extends DescMessage>(
  cmd: Command,
  key: K,
  page: (
    api: UserAPICore,
    pageToken: string,
  ) => Promise<{ nextPageToken: string } & Record<K, MessageShape<D>[]>>,
  table: ListTable<D>,
): Promise<void> {
  await withClient(cmd, async ({ api, out }) => {
    const { items, capped } = await readPages(table.schema, async (pageToken) => {
      const res = await page(api, pageToken);
      return { items: res[key], next: res.nextPageToken };
    });
    out.list({ [key]: items.map((m) => messageJson(table.schema, m)) }, table.headers, items.map(table.row));
    // On stderr, JSON output too: the list printed is not all of it.
    if (capped)
      out.note(
        `(more in the list: the CLI reads at most ${capped} of one; narrow it with --tenant or a filter)`,
      );
  });
}

/** A password from stdin (`--password-stdin`) or a prompt without echo. */
export async function readPassword(
  flags: { passwordStdin?: boolean },
  question = "Password: ",
): Promise<string> {
  return flags.passwordStdin ? readSecretFromStdin() : promptHidden(question);
}

/** Print a secret once, to stdout, with a reminder on stderr. */
export function showSecret(
  out: Output,
  json: Record<string, unknown>,
  fields: [string, string][],
  what: string,
): void {
  out.record(json, fields);
  if (!out.json) out.note(`Store the ${what} now: it is shown only once.`);
}
