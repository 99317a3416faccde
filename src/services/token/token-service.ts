import { randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { type Timestamp, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import type { FilterQuery } from "@mikro-orm/knex";
import {
  TokenKind,
  type TokenMetadataSchema,
  type TokenService,
} from "../../../gen/tessera/v1/token_service_pb.js";
import { auditTarget } from "../../admission/audit.js";
import { mayManage } from "../../auth/authority.js";
import { hashSecret } from "../../auth/password.js";
import type { Principal } from "../../auth/principal.js";
import { formatScopes, hasScope, parseScopeString } from "../../auth/scopes.js";
import { generateToken, tokenHint } from "../../auth/token-format.js";
import { type Clock, systemClock } from "../../clock.js";
import { requestState } from "../../context.js";
import { errors, TesseraError } from "../../errors.js";
import { countCredentialCreation, type RateLimits } from "../../rate-limit.js";
import { commitCreation } from "../../storage/commit-outcome.js";
import { User } from "../../storage/entities.js";
import type { Storage } from "../../storage/orm.js";
import { requestEms } from "../../storage/request-em.js";
import { ApiToken, type ApiTokenKind } from "../../storage/token-entities.js";
import {
  assertGrantableScopes,
  assertId,
  findReachable,
  noStore,
  principalOf,
  tenantScope,
  writeIfScopesHold,
} from "../common.js";
import { listPage, MAX_TIMESTAMP_MS, pageParams } from "../pagination.js";
import { assertMakerStands, revokeMadeWith } from "./maker.js";

/** The scope that lets a caller list and revoke every token of its tenant. */
export const ADMIN_TOKENS_SCOPE = "admin:tokens";

/** Longest token name accepted. */
export const MAX_TOKEN_NAME_LENGTH = 100;

/** Dependencies of the TokenService implementation. */
export interface TokenServiceDeps {
  storage: Storage;
  /** PBKDF2 iterations for new token hashes (`auth.passwordIterations`, 600k by default). */
  iterations: number;
  patPrefix: string;
  apiKeyPrefix: string;
  /** When set: new tokens counted per caller (`rateLimit.credentialCreationsPerHour`). */
  limits?: RateLimits | undefined;
  /** The clock a requested expiry and a revocation are read against (tests pass a manual one). */
  clock?: Clock;
}

/** The wire shape of a token's metadata: never its secret or hash. */
export function tokenToProto(token: ApiToken): MessageInitShape<typeof TokenMetadataSchema> {
  return {
    id: token.id,
    kind: token.kind === "pat" ? TokenKind.PERSONAL_ACCESS_TOKEN : TokenKind.API_KEY,
    name: token.name,
    hint: token.hint,
    scopes: parseScopeString(token.scopes),
    ownerUserId: token.ownerUserId,
    tenantId: token.tenantId,
    createdAt: timestampFromDate(token.createdAt),
    ...(token.expiresAt ? { expiresAt: timestampFromDate(token.expiresAt) } : {}),
    ...(token.lastUsedAt ? { lastUsedAt: timestampFromDate(token.lastUsedAt) } : {}),
    ...(token.revokedAt ? { revokedAt: timestampFromDate(token.revokedAt) } : {}),
    revoked: Boolean(token.revokedAt),
  };
}

interface CreateInput {
  name: string;
  expiresAt?: Timestamp | undefined;
  scopes: readonly string[];
}

interface ListInput {
  userId: string;
  allUsers: boolean;
  includeRevoked: boolean;
  pageSize: number;
  pageToken: string;
}

/** Control characters (C0, DEL, C1) have no place in a display name. */
const CONTROL_CHARS = /\p{Cc}/u;

/**
 * TokenService: personal access tokens and API keys. Both kinds share one table and one
 * lifecycle; the RPCs of a kind only ever see rows of that kind (another kind's id is
 * NotFound).
 */
export function createTokenService(deps: TokenServiceDeps): ServiceImpl<typeof TokenService> {
  const em = requestEms(deps.storage.em);
  const clock = deps.clock ?? systemClock;
  const prefixOf: Record<ApiTokenKind, string> = { pat: deps.patPrefix, api_key: deps.apiKeyPrefix };
  const label: Record<ApiTokenKind, string> = { pat: "personal access token", api_key: "API key" };

  /** Create a token of the caller; returns the row and the token (shown once). */
  async function create(
    ctx: HandlerContext,
    kind: ApiTokenKind,
    req: CreateInput,
  ): Promise<{ row: ApiToken; token: string }> {
    const principal = principalOf(ctx);
    if (principal.kind !== "user" || principal.tenantId === null) {
      throw new TesseraError("PRINCIPAL_NOT_ALLOWED", `only a user can own a ${label[kind]}`);
    }
    const name = req.name.trim();
    if (name.length < 1 || name.length > MAX_TOKEN_NAME_LENGTH || CONTROL_CHARS.test(name)) {
      throw errors.invalidArgument(`name must be 1-${MAX_TOKEN_NAME_LENGTH} printable characters`, "name");
    }
    let expiresAt: Date | null = null;
    if (req.expiresAt) {
      expiresAt = timestampDate(req.expiresAt);
      if (!(expiresAt.getTime() > clock()))
        throw errors.invalidArgument("expires_at must be in the future", "expires_at");
      // google.protobuf.Timestamp's own range: a later one is no timestamp any client can read back.
      if (!(expiresAt.getTime() <= MAX_TIMESTAMP_MS))
        throw errors.invalidArgument(
          "expires_at must be no later than 9999-12-31T23:59:59.999Z",
          "expires_at",
        );
    }
    // A token made with a token that ends ends no later: else a stolen, short-lived token
    // is laundered into one that never ends and survives the revocation of the stolen one.
    // (A session's access token is how a user makes tokens at all: it is not bounded so.)
    const parentEnd =
      principal.method === "pat" || principal.method === "api_key" ? principal.expiresAt : null;
    if (parentEnd !== null && parentEnd !== undefined) {
      if (expiresAt === null) expiresAt = new Date(parentEnd);
      else if (expiresAt.getTime() > parentEnd)
        throw new TesseraError(
          "ACCESS_DENIED",
          `a ${label[kind]} cannot outlive the token it is created with`,
        );
    }
    // No scopes asked for: the caller's current effective scopes, which for a caller
    // signed in with a token are already cut down to that token's (a token cannot mint
    // a stronger one).
    let scopes: readonly string[] = principal.scopes;
    if (req.scopes.length > 0) {
      assertGrantableScopes(principal, req.scopes);
      scopes = req.scopes;
    }
    await countCredentialCreation(deps.limits, principal);
    const prefix = prefixOf[kind];
    const generated = generateToken(prefix);
    const row = em(ctx).create(ApiToken, {
      id: randomUUID(),
      publicId: generated.id,
      kind,
      tenantId: principal.tenantId,
      ownerUserId: principal.id,
      name,
      scopes: formatScopes(scopes),
      secretHash: await hashSecret(generated.secret, deps.iterations),
      hint: tokenHint(generated.token, prefix),
      createdAt: new Date(clock()),
      expiresAt,
      lastUsedAt: null,
      revokedAt: null,
      madeWithTokenId:
        principal.method === "pat" || principal.method === "api_key"
          ? (principal.credentialId ?? null)
          : null,
    });
    // The secret is shown once: a COMMIT whose answer is lost is settled (was it saved?)
    // rather than answered as if nothing happened.
    await commitCreation(
      deps.storage,
      () => em(ctx).flush(),
      { kind: label[kind], id: row.id },
      async () => (await deps.storage.em.fork().count(ApiToken, { id: row.id })) > 0,
    );
    auditTarget(requestState(ctx.values), { id: row.id, tenantId: row.tenantId });
    try {
      await assertMakerStands(deps.storage.em.fork(), principal, requestState(ctx.values));
    } catch (err) {
      // Its secret is never shown; revoked (not deleted) so that its record stays listed.
      await deps.storage.em.fork().nativeUpdate(ApiToken, { id: row.id }, { revokedAt: new Date(clock()) });
      throw err;
    }
    return { row, token: generated.token };
  }

  /** Whose tokens a list request may see, as a filter; refuses what the caller may not ask. */
  async function listFilter(
    ctx: HandlerContext,
    principal: Principal,
    kind: ApiTokenKind,
    req: ListInput,
  ): Promise<FilterQuery<ApiToken>> {
    const isTokenAdmin = hasScope(principal.scopes, ADMIN_TOKENS_SCOPE);
    const where: FilterQuery<ApiToken> & Record<string, unknown> = { kind };
    if (req.allUsers) {
      if (!isTokenAdmin)
        throw new TesseraError("ACCESS_DENIED", `listing every user's tokens needs ${ADMIN_TOKENS_SCOPE}`);
      const scope = tenantScope(principal);
      if (scope !== null) where.tenantId = scope;
      const hidden = await unmanageableOwners(ctx, principal, scope);
      if (hidden.length > 0) where.ownerUserId = { $nin: hidden };
    } else if (req.userId && req.userId !== principal.id) {
      if (!isTokenAdmin)
        throw new TesseraError("ACCESS_DENIED", `listing another user's tokens needs ${ADMIN_TOKENS_SCOPE}`);
      assertId(req.userId, "user", "user_id");
      const owner = await findReachable(ctx, em(ctx), User, req.userId);
      // A user the caller may not manage reads exactly like one that does not exist.
      if (!owner || !mayManage(principal, { scopes: parseScopeString(owner.scopes) }))
        throw errors.notFound("user");
      where.ownerUserId = owner.id;
    } else {
      if (principal.kind !== "user") {
        throw errors.invalidArgument(
          `a ${principal.kind} principal owns no tokens: set user_id or all_users`,
          "user_id",
        );
      }
      where.ownerUserId = principal.id;
    }
    if (!req.includeRevoked) where.revokedAt = null;
    return where;
  }

  /**
   * Users of the caller's tenant (all tenants for a `*` caller: none then) whose tokens the
   * caller may not see: those holding a scope it lacks (assertMayManage's rule). The caller
   * itself is never among them (every user manages its own tokens, even through a token
   * cut down below its owner's scopes). Users without scopes are covered by anyone.
   */
  async function unmanageableOwners(
    ctx: HandlerContext,
    principal: Principal,
    tenantId: string | null,
  ): Promise<string[]> {
    if (hasScope(principal.scopes, "*")) return [];
    const users = await em(ctx).find(
      User,
      tenantId === null ? { scopes: { $ne: "" } } : { tenantId, scopes: { $ne: "" } },
      { fields: ["id", "scopes"] },
    );
    return users
      .filter((u) => u.id !== principal.id && !mayManage(principal, { scopes: parseScopeString(u.scopes) }))
      .map((u) => u.id);
  }

  async function list(ctx: HandlerContext, kind: ApiTokenKind, req: ListInput) {
    const principal = principalOf(ctx);
    const paging = pageParams(req.pageSize, req.pageToken);
    const where = await listFilter(ctx, principal, kind, req);
    const { items, nextPageToken, totalSize } = await listPage(em(ctx), ApiToken, where, paging);
    return { items: items.map(tokenToProto), nextPageToken, totalSize };
  }

  /**
   * Revoke a token the caller owns, or (with admin:tokens) any token of its tenant whose
   * owner the caller may manage (assertMayManage's rule). Anything else (missing, other
   * kind, other tenant, other user without the scope, an owner the caller may not manage)
   * is NotFound. Idempotent: a revoked token is returned unchanged. The update is
   * committed (flushed) before the call returns, and the verifier reads the row on
   * every request, so the token is refused from the next request on.
   */
  async function revoke(ctx: HandlerContext, kind: ApiTokenKind, id: string) {
    const principal = principalOf(ctx);
    assertId(id, label[kind]);
    const row = await findReachable(ctx, em(ctx), ApiToken, id, { kind });
    const visible =
      row !== null && (row.ownerUserId === principal.id || hasScope(principal.scopes, ADMIN_TOKENS_SCOPE));
    if (!visible) throw errors.notFound(label[kind]);
    let owner: User | null = null;
    if (row.ownerUserId !== principal.id) {
      // Another user's token: only with authority over that user (its owner's current
      // scopes, or the token's own if the owner is gone); else it reads as missing, so a
      // weaker admin learns nothing of a stronger user's tokens.
      owner = await em(ctx).findOne(User, { id: row.ownerUserId });
      if (!mayManage(principal, { scopes: parseScopeString(owner ? owner.scopes : row.scopes) }))
        throw errors.notFound(label[kind]);
    }
    if (!row.revokedAt) {
      row.revokedAt = new Date(clock());
      // Committed only if another user owning it still holds the scopes checked (not promoted meanwhile).
      if (owner) await writeIfScopesHold(em(ctx), User, owner.id, owner.scopes, (tx) => tx.flush());
      else await em(ctx).flush();
    }
    await revokeMadeWith(em(ctx), row.id, row.revokedAt);
    return tokenToProto(row);
  }

  /** What a create answer holds besides the secret (which each RPC names its own way). */
  function createdFields(row: ApiToken) {
    const meta = tokenToProto(row);
    return {
      id: row.id,
      name: row.name,
      createdAt: meta.createdAt,
      ...(meta.expiresAt ? { expiresAt: meta.expiresAt } : {}),
      scopes: meta.scopes,
      hint: row.hint,
      ownerUserId: row.ownerUserId,
    };
  }

  return {
    async createPersonalAccessToken(req, ctx) {
      const { row, token } = await create(ctx, "pat", req);
      noStore(ctx);
      return { ...createdFields(row), token };
    },

    async listPersonalAccessTokens(req, ctx) {
      const { items, nextPageToken, totalSize } = await list(ctx, "pat", req);
      return { tokens: items, nextPageToken, totalSize };
    },

    async revokePersonalAccessToken(req, ctx) {
      return { token: await revoke(ctx, "pat", req.id) };
    },

    async createApiKey(req, ctx) {
      const { row, token } = await create(ctx, "api_key", req);
      noStore(ctx);
      return { ...createdFields(row), key: token };
    },

    async listApiKeys(req, ctx) {
      const { items, nextPageToken, totalSize } = await list(ctx, "api_key", req);
      return { apiKeys: items, nextPageToken, totalSize };
    },

    async revokeApiKey(req, ctx) {
      return { apiKey: await revoke(ctx, "api_key", req.id) };
    },
  };
}
