import { randomBytes } from "node:crypto";
import {
  chmodSync,
  closeSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import { CLIENT_ENV } from "./client-env.js";
import { ClientConfigError, CredentialsFileError } from "./errors.js";

/**
 * Client-side credentials: environment variables and the profile file
 * `~/.tessera/credentials` (YAML, one mapping per named profile):
 *
 * ```yaml
 * default:
 *   server: localhost:50052
 *   token: eyJ...
 *   refresh_token: tsr_rt_...
 *   cert_folder: /home/me/.tessera/certs/dev
 * prod:
 *   server: tessera.example.com:50052
 *   token: tsr_pat_...
 *   ca_file: /etc/ssl/tessera-ca.pem
 * ```
 *
 * The file holds secrets, so it is read only when its mode gives group and others no
 * access at all (like ssh's private keys), and written with mode 0600 in a 0700 folder.
 */

/** One named profile of the credentials file. Keys are snake_case in the file. */
export interface Profile {
  /** host:port of the server. */
  server?: string;
  /** Access token (a session JWT) or an opaque token (personal access token, API key). */
  token?: string;
  /** Refresh token of a `tessera login` session. */
  refresh_token?: string;
  /** Folder with ca.crt (and client.crt + client.key for mutual TLS). */
  cert_folder?: string;
  /** CA bundle to verify the server with (instead of the system roots). */
  ca_file?: string;
}

const PROFILE_KEYS = ["server", "token", "refresh_token", "cert_folder", "ca_file"] as const;

/** The profile used when neither `--profile` nor TESSERA_PROFILE names one. */
export const DEFAULT_PROFILE = "default";

export { CLIENT_ENV };

/** The environment a lookup reads (defaults to process.env). */
export type Env = Readonly<Record<string, string | undefined>>;

/** Where the credentials file lives: TESSERA_CREDENTIALS_FILE, else $HOME/.tessera/credentials. */
export function credentialsPath(env: Env = process.env): string {
  const explicit = env[CLIENT_ENV.credentialsFile];
  if (explicit) return explicit;
  return join(env.HOME || homedir(), ".tessera", "credentials");
}

/** The profile name in effect: explicit, else TESSERA_PROFILE, else "default". */
export function profileName(explicit: string | undefined, env: Env = process.env): string {
  return explicit || env[CLIENT_ENV.profile] || DEFAULT_PROFILE;
}

function modeString(mode: number): string {
  return `0${(mode & 0o777).toString(8).padStart(3, "0")}`;
}

/**
 * Refuse a credentials file (or its folder) that group or others can access, or that
 * another user owns. The message says why and how to fix it.
 */
function assertPrivate(path: string, kind: "file" | "folder"): void {
  const st = statSync(path);
  if (kind === "file" && !st.isFile())
    throw new CredentialsFileError(`credentials file ${path} is not a regular file`, { path });
  if (typeof process.getuid === "function" && st.uid !== process.getuid()) {
    throw new CredentialsFileError(
      `refusing to use credentials ${kind} ${path}: it is owned by another user (uid ${st.uid})`,
      { path },
    );
  }
  if (kind === "file" && (st.mode & 0o077) !== 0) {
    throw new CredentialsFileError(
      `refusing to read credentials file ${path}: its mode ${modeString(st.mode)} lets group or others access the secrets in it; ` +
        `restrict it to its owner with: chmod 600 ${path}`,
      { path },
    );
  }
}

/** All profiles of a credentials file; an absent file has none. Refuses a file others can read. */
export function readCredentialsFile(path: string = credentialsPath()): Record<string, Profile> {
  let text: string;
  try {
    assertPrivate(path, "file");
    text = readFileSync(path, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return {};
    if (err instanceof ClientConfigError) throw err;
    throw new ClientConfigError(
      `cannot read credentials file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
      {
        path,
        cause: err,
      },
    );
  }
  let doc: unknown;
  try {
    // Warnings (an unknown tag) are not emitted: process.emitWarning would print the line, a token's.
    doc = parseYaml(text, { logLevel: "error" });
  } catch (err) {
    // The YAML parser quotes the offending text; that may be a token, so keep only the position.
    const pos = (err as { linePos?: { line: number }[] }).linePos?.[0]?.line;
    throw new ClientConfigError(`credentials file ${path} is not valid YAML${pos ? ` (line ${pos})` : ""}`, {
      path,
    });
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== "object" || Array.isArray(doc)) {
    throw new ClientConfigError(`credentials file ${path} must map profile names to profiles`, { path });
  }
  const profiles: Record<string, Profile> = {};
  for (const [name, value] of Object.entries(doc as Record<string, unknown>)) {
    if (value === null || value === undefined) {
      profiles[name] = {};
      continue;
    }
    if (typeof value !== "object" || Array.isArray(value)) {
      throw new ClientConfigError(`credentials file ${path}: profile "${name}" must be a mapping`, { path });
    }
    const profile: Profile = {};
    for (const [key, v] of Object.entries(value as Record<string, unknown>)) {
      if (!(PROFILE_KEYS as readonly string[]).includes(key)) {
        throw new ClientConfigError(
          `credentials file ${path}: profile "${name}" has unknown key "${key}" (known: ${PROFILE_KEYS.join(", ")})`,
          {
            path,
          },
        );
      }
      if (typeof v !== "string") {
        throw new ClientConfigError(
          `credentials file ${path}: profile "${name}" key "${key}" must be a string`,
          { path },
        );
      }
      profile[key as keyof Profile] = v;
    }
    profiles[name] = profile;
  }
  return profiles;
}

/** One profile of the credentials file, or undefined when the file or the profile is absent. */
export function readProfile(name: string, path: string = credentialsPath()): Profile | undefined {
  return readCredentialsFile(path)[name];
}

/**
 * Replace (or with `undefined`, delete) one profile and write the file atomically with
 * mode 0600, creating its folder with mode 0700. Other profiles are kept as they were.
 */
export function writeProfile(
  name: string,
  profile: Profile | undefined,
  path: string = credentialsPath(),
): void {
  const dir = dirname(path);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  assertPrivate(dir, "folder");
  const profiles = readCredentialsFile(path);
  if (profile === undefined) delete profiles[name];
  else {
    const clean: Profile = {};
    for (const key of PROFILE_KEYS) if (profile[key]) clean[key] = profile[key];
    profiles[name] = clean;
  }
  const text = `# Tessera client credentials (tessera login). Keep this file mode 0600.\n${stringifyYaml(profiles)}`;
  const tmp = `${path}.${randomBytes(6).toString("hex")}.tmp`;
  // O_EXCL + 0600 at creation: the secrets are never readable by others, not even briefly.
  const fd = openSync(tmp, "wx", 0o600);
  try {
    try {
      writeSync(fd, text);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    chmodSync(tmp, 0o600);
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }
}

/** A server address: host and port. */
export interface ServerAddress {
  host: string;
  port: number;
  /** false only for an explicit http:// address (a plaintext development server). */
  tls: boolean;
}

/** The default port of a Tessera server. */
export const DEFAULT_PORT = 50052;

/**
 * Parse `host:port`, `host` (port 50052), `[::1]:port`, or `https://host:port` /
 * `http://host:port` (plaintext, development only).
 */
export function parseServerAddress(value: string, what = "server address"): ServerAddress {
  const raw = value.trim();
  const fail = () =>
    new ClientConfigError(`invalid ${what} "${raw}": expected host:port, e.g. localhost:${DEFAULT_PORT}`);
  if (raw.length === 0) throw fail();
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(raw)) {
    let url: URL;
    try {
      url = new URL(raw);
    } catch {
      throw fail();
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") throw fail();
    if ((url.pathname && url.pathname !== "/") || url.search || url.username) throw fail();
    const host = url.hostname.startsWith("[") ? url.hostname.slice(1, -1) : url.hostname;
    return { host, port: url.port ? Number(url.port) : DEFAULT_PORT, tls: url.protocol === "https:" };
  }
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s/]+))(?::(\d{1,5}))?$/.exec(raw);
  if (!m) throw fail();
  const host = m[1] ?? m[2]!;
  const port = m[3] ? Number(m[3]) : DEFAULT_PORT;
  if (port < 1 || port > 65535) throw fail();
  return { host, port, tls: true };
}
