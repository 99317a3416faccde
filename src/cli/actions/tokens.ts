import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Command } from "commander";
import {
  CreateApiKeyResponseSchema,
  CreatePersonalAccessTokenResponseSchema,
  type TokenMetadata,
  TokenMetadataSchema,
  TokenService,
} from "../../../gen/tessera/v1/token_service_pb.js";
import { messageJson, when } from "../messages.js";
import { expiryFrom, listAll, scopeList, showSecret, withClient } from "./run.js";

// `tessera token …` (personal access tokens) and `tessera api-key …`: one set of actions.

/** Whether a token command is `token` (personal access tokens) rather than `api-key`. */
function isPat(cmd: Command): boolean {
  return cmd.parent?.name() === "token";
}

function tokenRow(t: TokenMetadata): string[] {
  const status = t.revoked
    ? "revoked"
    : t.expiresAt && t.expiresAt.seconds * 1000n < BigInt(Date.now())
      ? "expired"
      : "active";
  return [t.id, t.name, t.hint, t.scopes.join(" ") || "-", when(t.expiresAt), when(t.lastUsedAt), status];
}

const TOKEN_TABLE = {
  schema: TokenMetadataSchema,
  headers: ["ID", "NAME", "HINT", "SCOPES", "EXPIRES", "LAST USED", "STATUS"],
  row: tokenRow,
};

/** The actions, by the name client-commands.ts registers them under. */
export const actions = {
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
      const tokens = api.client(TokenService);
      const [res, json, secret] = pat
        ? await tokens
            .createPersonalAccessToken(req)
            .then((r) => [r, messageJson(CreatePersonalAccessTokenResponseSchema, r), r.token] as const)
        : await tokens
            .createApiKey(req)
            .then((r) => [r, messageJson(CreateApiKeyResponseSchema, r), r.key] as const);
      const rows: [string, string][] = [
        ["id", res.id],
        ["name", res.name],
        ["scopes", res.scopes.join(" ")],
        ["expires", when(res.expiresAt)],
        [pat ? "token" : "key", secret],
      ];
      showSecret(out, json, rows, pat ? "token" : "API key");
    });
  },

  tokenList: (flags: { user?: string; allUsers?: boolean; includeRevoked?: boolean }, cmd: Command) => {
    const base = {
      userId: flags.user ?? "",
      allUsers: flags.allUsers ?? false,
      includeRevoked: flags.includeRevoked ?? false,
      pageSize: 200,
    };
    return isPat(cmd)
      ? listAll(
          cmd,
          "tokens",
          (api, pageToken) => api.client(TokenService).listPersonalAccessTokens({ ...base, pageToken }),
          TOKEN_TABLE,
        )
      : listAll(
          cmd,
          "apiKeys",
          (api, pageToken) => api.client(TokenService).listApiKeys({ ...base, pageToken }),
          TOKEN_TABLE,
        );
  },

  tokenRevoke: async (id: string, _flags: unknown, cmd: Command) => {
    const pat = isPat(cmd);
    const noun = pat ? "personal access token" : "API key";
    await withClient(cmd, async ({ api, out }) => {
      const meta = pat
        ? (await api.client(TokenService).revokePersonalAccessToken({ id })).token
        : (await api.client(TokenService).revokeApiKey({ id })).apiKey;
      out.message(
        meta ? messageJson(TokenMetadataSchema, meta) : { id, revoked: true },
        `Revoked ${noun} ${id}${meta ? ` (${meta.name})` : ""}.`,
      );
    });
  },
};
