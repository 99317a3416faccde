import {
  CLIENT_ENV,
  credentialsPath,
  DEFAULT_PORT,
  type Env,
  type Profile,
  parseServerAddress,
  profileName,
  readCredentialsFile,
} from "./credentials.js";
import { ClientConfigError } from "./errors.js";
import type { UserAPIOptions } from "./user-api.js";

/** Options of {@link UserAPI.fromEnvironment}: explicit values win over the environment and the profile. */
export interface FromEnvironmentOptions extends UserAPIOptions {
  /** Profile of the credentials file (default: TESSERA_PROFILE, else "default"). */
  profile?: string | undefined;
  /** `host:port`; the same as TESSERA_SERVER, winning over it. */
  server?: string | undefined;
  /** The environment to read (default: process.env). */
  env?: Env | undefined;
  /** The credentials file (default: TESSERA_CREDENTIALS_FILE, else ~/.tessera/credentials). */
  credentialsFile?: string | undefined;
}

/** Where each resolved setting came from, and the profile in effect. */
export interface ResolvedClientOptions {
  options: UserAPIOptions;
  /** The profile name in effect (whether or not the file has it). */
  profile: string;
  /** The credentials file consulted (it may not exist). */
  credentialsFile: string;
  /** The profile as read, when the file was consulted and had it. */
  profileData: Profile | undefined;
  /** Where the token came from. */
  tokenSource: "option" | "env" | "profile" | undefined;
  /**
   * The profile's `server` when the address in effect is another server: the profile's
   * token and refresh token were then left out (they are that server's to see).
   */
  profileElsewhere: string | undefined;
}

/** Whether `profileServer` (a profile's `server`) names the server at `host`, `port`, `tls`. */
function sameServer(profileServer: string, host: string, port: number, tls: boolean): boolean {
  let a: ReturnType<typeof parseServerAddress>;
  try {
    a = parseServerAddress(profileServer);
  } catch {
    return false;
  }
  return a.host.toLowerCase() === host.toLowerCase() && a.port === port && a.tls === tls;
}

/**
 * Resolve client options: explicit options, then the environment (TESSERA_TOKEN,
 * TESSERA_SERVER, TESSERA_CERT_FOLDER, TESSERA_CA_FILE), then the profile. The
 * credentials file is read only when a profile is named or a token or server is still
 * missing, so a fully specified environment never depends on it. A token from the
 * options or the environment is never paired with the profile's refresh token.
 */
export function resolveClientOptions(
  options: FromEnvironmentOptions = {},
  behaviour: {
    /** A named profile absent from the file is not an error (`tessera login` creates it). */
    allowMissingProfile?: boolean;
    /** Read the profile even when the options and the environment need nothing from it. */
    alwaysReadProfile?: boolean;
  } = {},
): ResolvedClientOptions {
  const env = options.env ?? process.env;
  const { profile: explicitProfile, server, env: _env, credentialsFile: explicitFile, ...rest } = options;
  const name = profileName(explicitProfile, env);
  const file = explicitFile ?? credentialsPath(env);
  const named = Boolean(explicitProfile || env[CLIENT_ENV.profile]);

  const envToken = env[CLIENT_ENV.token] || undefined;
  const envServer = env[CLIENT_ENV.server] || undefined;
  let token = rest.token;
  let tokenSource: ResolvedClientOptions["tokenSource"] = token ? "option" : undefined;
  if (!token && envToken) {
    token = envToken;
    tokenSource = "env";
  }
  const explicitAddress = server ?? (rest.host ? undefined : envServer);
  const needProfile = behaviour.alwaysReadProfile || named || !token || (!explicitAddress && !rest.host);
  let profileData: Profile | undefined;
  if (needProfile) {
    profileData = readCredentialsFile(file)[name];
    if (!profileData && explicitProfile && !behaviour.allowMissingProfile) {
      throw new ClientConfigError(
        `profile "${name}" not found in ${file} (run: tessera login --profile ${name})`,
        { path: file },
      );
    }
  }
  const resolved: UserAPIOptions = { ...rest };
  const address = explicitAddress ?? profileData?.server;
  if (!rest.host && address) {
    const a = parseServerAddress(
      address,
      explicitAddress ? (server ? "--server" : CLIENT_ENV.server) : `server of profile "${name}"`,
    );
    resolved.host = a.host;
    resolved.port = rest.port ?? a.port;
    if (!a.tls) resolved.plaintext = rest.plaintext ?? true;
  }
  resolved.host ??= "localhost";
  resolved.port ??= DEFAULT_PORT;
  // A profile's session belongs to the server it was opened on: another address in effect
  // (--server, TESSERA_SERVER, host/port options) must not receive its tokens, least of
  // all the refresh token, which the client would spend there.
  const profileElsewhere =
    profileData?.server !== undefined &&
    !sameServer(profileData.server, resolved.host, resolved.port, resolved.plaintext !== true)
      ? profileData.server
      : undefined;
  let refreshToken = rest.refreshToken;
  if (!token && profileData?.token && profileElsewhere === undefined) {
    token = profileData.token;
    tokenSource = "profile";
    refreshToken ??= profileData.refresh_token;
  }
  resolved.token = token;
  resolved.refreshToken = refreshToken;
  resolved.certFolder =
    rest.certFolder ?? (env[CLIENT_ENV.certFolder] || undefined) ?? profileData?.cert_folder;
  resolved.caFile = rest.caFile ?? (env[CLIENT_ENV.caFile] || undefined) ?? profileData?.ca_file;
  return {
    options: resolved,
    profile: name,
    credentialsFile: file,
    profileData,
    tokenSource,
    profileElsewhere,
  };
}
