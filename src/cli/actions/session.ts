import { resolve } from "node:path";
import type { Command } from "commander";
import { CLIENT_ENV, type Profile, writeProfile } from "../../sdk/credentials.js";
import { ClientConfigError } from "../../sdk/errors.js";
import { UserAPICore } from "../../sdk/user-api-core.js";
import { Output } from "../output.js";
import { globals, readPassword, sessionConnection, withClient } from "./run.js";
import { printUser } from "./whoami.js";

// `tessera login`, `logout` and `whoami`.

/** The actions, by the name client-commands.ts registers them under. */
export const actions = {
  login: async (flags: { username: string; tenant?: string; passwordStdin?: boolean }, cmd: Command) => {
    const g = globals(cmd);
    const { resolved, connection } = sessionConnection(g);
    // Configuration problems (a bad cert folder) surface before the password is asked for.
    const api = new UserAPICore(connection);
    try {
      const password = await readPassword(flags);
      const result = await api.login(
        flags.username,
        password,
        flags.tenant !== undefined ? { tenant: flags.tenant } : {},
      );
      const hostPort = `${api.host.includes(":") ? `[${api.host}]` : api.host}:${api.port}`;
      // A plaintext server keeps its scheme: as host:port the profile would name a TLS server,
      // which its session's next command (and its logout) would not reach.
      const server = connection.plaintext ? `http://${hostPort}` : hostPort;
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
    // The refresh token ends the session on its own server only; sent elsewhere it is given away.
    if (resolved.profileElsewhere !== undefined)
      throw new ClientConfigError(
        `profile "${resolved.profile}" is logged in to ${resolved.profileElsewhere}, not to ${connection.host}:${connection.port}: ` +
          "log out without --server (or with that server) to end its session",
      );
    let serverRevoked = false;
    if (profile.refresh_token) {
      const api = new UserAPICore(connection);
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

  /** whoami through the SDK client (a profile's session, `--protocol grpc`): whoami.ts decides. */
  whoami: async (_flags: unknown, cmd: Command) => {
    await withClient(cmd, async ({ api, out, resolved }) => {
      printUser(
        out,
        await api.getUser(),
        `${api.host}:${api.port}`,
        resolved.tokenSource === "profile" ? resolved.profile : undefined,
      );
    });
  },
};
