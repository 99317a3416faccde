import { randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import type { EntityManager } from "@mikro-orm/knex";
import type { UserSchema, UserService } from "../../../gen/tessera/v1/user_service_pb.js";
import { auditTarget } from "../../admission/audit.js";
import { assertMayManage, NEW_PRINCIPAL } from "../../auth/authority.js";
import { hashPool } from "../../auth/hash-pool.js";
import { dummyPasswordHash, hashSecret, verifySecret } from "../../auth/password.js";
import type { PasswordUpgrader } from "../../auth/password-upgrade.js";
import { formatScopes, parseScopeString } from "../../auth/scopes.js";
import { isTenantId } from "../../auth/user-principal.js";
import { DEFAULT_TENANT_NAME } from "../../bootstrap.js";
import { requestState } from "../../context.js";
import { errors, TesseraError } from "../../errors.js";
import { countCredentialCreation, type PasswordAttempt, type RateLimits } from "../../rate-limit.js";
import { Tenant, User } from "../../storage/entities.js";
import type { Storage } from "../../storage/orm.js";
import type { UserStateRepository } from "../../storage/repositories/subject-state.js";
import { requestEms } from "../../storage/request-em.js";
import {
  assertId,
  assertPassword,
  assertUsername,
  findReachable,
  noStore,
  principalChanged,
  principalOf,
  reachesTenant,
  tenantWhere,
  writeIfScopesHold,
} from "../common.js";
import { listRequest } from "../pagination.js";
import { createCurrentUserAnswer } from "./current-user.js";
import type { SessionIssuer, TokenPair } from "./sessions.js";

/** Dependencies of the UserService implementation. */
export interface UserServiceDeps {
  storage: Storage;
  sessions: SessionIssuer;
  passwordIterations: number;
  defaultTenantId: () => Promise<string>;
  limits?: RateLimits | undefined;
  /**
   * Prepared-statement reads of a user's row. GetCurrentUser, the call clients make most,
   * reads through it instead of forking an EntityManager (an ORM fork plus findOne per
   * call took most of such a call's throughput under load: commit 6fe85af). Without it,
   * the ORM.
   */
  users?: UserStateRepository;
  /** Re-hashes a password Login accepted when its hash has other parameters than `passwordIterations`. */
  upgrader: PasswordUpgrader;
}

/** The wire shape of a user. */
export function userToProto(user: User): MessageInitShape<typeof UserSchema> {
  return {
    id: user.id,
    username: user.username,
    tenantId: user.tenantId,
    permissions: parseScopeString(user.scopes),
    disabled: user.disabled,
    createdAt: timestampFromDate(user.createdAt),
    updatedAt: timestampFromDate(user.updatedAt),
  };
}

const GENERIC_LOGIN_FAILURE = "invalid username or password";

/**
 * The user a Login names: in `tenant` (a tenant id, or else its name) when one is given;
 * without one, the default tenant's user of that name, else the one from the time
 * usernames were global (`tenantlessLogin`): the same rule as HTTP Basic's (see
 * BY_USERNAME in user-principal.ts for why not simply the oldest). Null when there is
 * none (an unknown tenant included).
 */
async function loginUser(em: EntityManager, username: string, tenant: string): Promise<User | null> {
  if (!tenant) {
    const byDefault = await em.findOne(Tenant, { name: DEFAULT_TENANT_NAME });
    const inDefault = byDefault ? await em.findOne(User, { username, tenantId: byDefault.id }) : null;
    return (
      inDefault ??
      em.findOne(User, { username, tenantlessLogin: true }, { orderBy: { createdAt: "asc", id: "asc" } })
    );
  }
  if (isTenantId(tenant)) return em.findOne(User, { username, tenantId: tenant });
  const named = await em.findOne(Tenant, { name: tenant });
  return named ? em.findOne(User, { username, tenantId: named.id }) : null;
}

/** UserService: sessions and user administration. */
export function createUserService(deps: UserServiceDeps): ServiceImpl<typeof UserService> {
  const { storage, sessions } = deps;
  const em = requestEms(storage.em);
  const currentUser = createCurrentUserAnswer();

  /** A user visible to the caller, or NotFound (another tenant's user reads as missing). */
  async function visibleUser(ctx: HandlerContext, id: string): Promise<User> {
    assertId(id, "user");
    const user = await findReachable(ctx, em(ctx), User, id);
    if (!user) throw errors.notFound("user");
    return user;
  }

  return {
    async login(req, ctx) {
      const state = requestState(ctx.values);
      if (!req.username || !req.password) throw errors.invalidArgument("username and password are required");
      // A full hash pool answers at once, before any look-up: a flood's refusals stay cheap.
      hashPool().assertRoom();
      // Budget reserved before PBKDF2, so that concurrent guesses cannot all get a verdict.
      // Keyed as named (the same key as HTTP Basic's `<tenant>/<username>`): two same-named
      // users of two tenants do not share a lockout. Not normalised to the account found
      // (name vs id vs tenant-less): keys that merge only when an account exists would let
      // an attacker learn, from a shared lockout, which tenant holds a username.
      // Every check counts, a right password's too: each one is a full PBKDF2 (no cache for
      // Login), and looped by one account's holder they would keep the hash pool full.
      const attempt = await deps.limits?.passwords.reserve(
        state.ip,
        req.tenant ? `${req.tenant}/${req.username}` : req.username,
        { everyCheck: true },
      );
      let user: User | null;
      let ok: boolean;
      let tenant: Tenant | null;
      try {
        user = await loginUser(em(ctx), req.username, req.tenant);
        // Same PBKDF2 work whether or not the user exists, and one message for every failure;
        // a disabled user's the same too, its hash (never upgraded while refused) maybe older.
        ok = await verifySecret(
          req.password,
          user === null
            ? await dummyPasswordHash(deps.passwordIterations)
            : user.disabled
              ? await deps.upgrader.refusalHash(user.passwordHash)
              : user.passwordHash,
        );
        tenant = user && ok ? await em(ctx).findOne(Tenant, { id: user.tenantId }) : null;
      } catch (err) {
        await attempt?.cancelled();
        throw err;
      }
      // A user that exists is named in the record, in its tenant, so that the tenant's
      // admins see guessing against their users; an unknown username is recorded exactly as
      // before (no tenant, no target): the record of a name is not an oracle of its existence.
      if (user) auditTarget(state, { id: user.id, tenantId: user.tenantId });
      if (!user || !ok || user.disabled || !tenant || tenant.disabled) {
        await attempt?.failed();
        throw new TesseraError("CREDENTIALS_INVALID", GENERIC_LOGIN_FAILURE);
      }
      await attempt?.succeeded();
      state.principal = {
        kind: "user",
        method: "password",
        id: user.id,
        tenantId: user.tenantId,
        username: user.username,
        scopes: [],
      };
      // A concurrent login's re-hash of this password (below) is no password change.
      const pair = await sessions.issue(em(ctx), user, undefined, undefined, (stored) =>
        verifySecret(req.password, stored),
      );
      // Only now, the login granted (a refused one rewrites nothing), and after the session's
      // check that the hash read is still the user's: that check is what a password change
      // racing this login must meet, and an upgraded hash would fail it.
      const { id, passwordHash } = user;
      await deps.upgrader.upgrade("user", id, req.password, passwordHash, async (from, to) => {
        // Not through the entity: a flush would overwrite a password changed meanwhile.
        return (await em(ctx).nativeUpdate(User, { id, passwordHash: from }, { passwordHash: to })) > 0;
      });
      noStore(ctx);
      return { ...sessionAnswer(pair), user: userToProto(user) };
    },

    async refreshToken(req, ctx) {
      if (!req.refreshToken) throw errors.invalidArgument("refresh_token is required", "refresh_token");
      const state = requestState(ctx.values);
      const pair = await sessions.rotate(em(ctx), req.refreshToken, {
        resolved: (user) => auditTarget(state, { id: user.id, tenantId: user.tenantId }),
      });
      noStore(ctx);
      return sessionAnswer(pair);
    },

    async logout(req, ctx) {
      if (!req.refreshToken) throw errors.invalidArgument("refresh_token is required", "refresh_token");
      const state = requestState(ctx.values);
      await sessions.logout(em(ctx), req.refreshToken, (user) =>
        auditTarget(state, { id: user.id, tenantId: user.tenantId }),
      );
      return {};
    },

    async getCurrentUser(_req, ctx) {
      const principal = principalOf(ctx);
      if (principal.kind === "admin") {
        // The static admin token has no user row: it answers as itself, spanning tenants.
        return {
          id: principal.id,
          username: principal.username ?? principal.id,
          tenantId: principal.tenantId ?? "",
          permissions: [...principal.scopes],
        };
      }
      // The row authentication read for this very request when it has one (JWT, Basic).
      const read = requestState(ctx.values).user;
      const row =
        read?.id === principal.id
          ? read
          : deps.users
            ? await deps.users.byId(principal.id)
            : await em(ctx).findOne(User, { id: principal.id });
      if (!row) throw new TesseraError("TOKEN_REVOKED", "the credential's user no longer exists");
      return currentUser(principal, row);
    },

    async changePassword(req, ctx) {
      const principal = principalOf(ctx);
      assertPassword(req.newPassword, "new_password");
      const user = await em(ctx).findOne(User, { id: principal.id });
      if (!user) throw new TesseraError("TOKEN_REVOKED", "the credential's user no longer exists");
      // The new password is a new secret: counted before either PBKDF2, since the password
      // check's budget below is refunded on success and so bounds only wrong guesses.
      const refundCreation = await countCredentialCreation(deps.limits, principal);
      let attempt: PasswordAttempt | undefined;
      let ok: boolean;
      try {
        // A password check like Login's: a stolen access token must not buy unlimited guesses.
        attempt = await deps.limits?.passwords.reserve(
          requestState(ctx.values).ip,
          `${user.tenantId}/${user.username}`,
          { everyCheck: true },
        );
        ok = await verifySecret(req.currentPassword, user.passwordHash);
      } catch (err) {
        await attempt?.cancelled();
        await refundCreation();
        throw err;
      }
      if (!ok) {
        await attempt?.failed();
        await refundCreation();
        throw new TesseraError("CREDENTIALS_INVALID", "current password is wrong");
      }
      await attempt?.succeeded();
      user.passwordHash = await hashSecret(req.newPassword, deps.passwordIterations);
      await em(ctx).flush();
      await sessions.revokeUser(em(ctx), user.id);
      if (req.revokeTokens) await sessions.revokeUserTokens(em(ctx), user.id);
      return {};
    },

    async createUser(req, ctx) {
      const principal = principalOf(ctx);
      assertUsername(req.username);
      assertPassword(req.password);
      assertMayManage(principal, NEW_PRINCIPAL, req.scopes);
      let tenantId = req.tenantId ?? principal.tenantId ?? (await deps.defaultTenantId());
      if (req.tenantId !== undefined) {
        assertId(req.tenantId, "tenant", "tenant_id");
        tenantId = req.tenantId;
      }
      // Another tenant reads exactly like a tenant that does not exist (no oracle).
      const tenant = reachesTenant(ctx, tenantId) ? await em(ctx).findOne(Tenant, { id: tenantId }) : null;
      if (!tenant) throw errors.notFound("tenant");
      // Unique per tenant: a name taken only in another tenant is simply free here.
      if (await em(ctx).count(User, { tenantId, username: req.username }))
        throw errors.alreadyExists("username is taken");
      // Its password is a new secret: counted before its PBKDF2 (see countCredentialCreation).
      await countCredentialCreation(deps.limits, principal);
      const now = new Date();
      const user = em(ctx).create(User, {
        id: randomUUID(),
        tenantId,
        username: req.username,
        passwordHash: await hashSecret(req.password, deps.passwordIterations),
        scopes: formatScopes(req.scopes),
        disabled: false,
        createdAt: now,
        updatedAt: now,
      });
      await em(ctx).flush();
      auditTarget(requestState(ctx.values), { id: user.id, tenantId });
      return { user: userToProto(user) };
    },

    async getUser(req, ctx) {
      return { user: userToProto(await visibleUser(ctx, req.id)) };
    },

    async listUsers(req, ctx) {
      const { items, ...page } = await listRequest(
        em(ctx),
        User,
        req,
        tenantWhere(principalOf(ctx), "tenantId"),
      );
      return { users: items.map(userToProto), ...page };
    },

    async updateUser(req, ctx) {
      const principal = principalOf(ctx);
      const user = await visibleUser(ctx, req.id);
      if (req.password !== undefined && user.id === principal.id) {
        // A stolen access token (or PAT) must not be enough to take the account over for good:
        // ChangePassword checks the current password and spends failure budget on it.
        throw new TesseraError(
          "FAILED_PRECONDITION",
          "you cannot set your own password with UpdateUser; use ChangePassword, which checks the current one",
        );
      }
      // Every field (password, disabled, scopes) needs authority over the user as it is
      // and as it would be.
      assertMayManage(principal, { scopes: parseScopeString(user.scopes) }, req.scopes?.scopes);
      const checked = user.scopes;
      if (req.scopes) user.scopes = formatScopes(req.scopes.scopes);
      let revoke = false;
      if (req.disabled !== undefined) {
        if (req.disabled && user.id === principal.id) {
          throw new TesseraError("FAILED_PRECONDITION", "you cannot disable yourself");
        }
        user.disabled = req.disabled;
        revoke ||= req.disabled;
      }
      if (req.password !== undefined) {
        assertPassword(req.password);
        await countCredentialCreation(deps.limits, principal);
        user.passwordHash = await hashSecret(req.password, deps.passwordIterations);
        revoke = true;
      }
      user.updatedAt = new Date();
      // Committed only if the user still holds what was checked (or what this sets).
      await writeIfScopesHold(em(ctx), User, user.id, user.scopes, (tx) => tx.flush(), checked);
      if (revoke) await sessions.revokeUser(em(ctx), user.id);
      if (req.revokeTokens) await sessions.revokeUserTokens(em(ctx), user.id);
      return { user: userToProto(user) };
    },

    async deleteUser(req, ctx) {
      const principal = principalOf(ctx);
      const user = await visibleUser(ctx, req.id);
      if (user.id === principal.id)
        throw new TesseraError("FAILED_PRECONDITION", "you cannot delete yourself");
      assertMayManage(principal, { scopes: parseScopeString(user.scopes) });
      // Deleted only if it still holds the scopes checked (not promoted meanwhile).
      if ((await em(ctx).nativeDelete(User, { id: user.id, scopes: user.scopes })) === 0)
        throw principalChanged();
      return {};
    },
  };
}

/** A session's tokens, as Login and RefreshToken answer them. */
function sessionAnswer(pair: TokenPair) {
  return {
    accessToken: pair.accessToken,
    accessTokenExpiresAt: timestampFromDate(pair.accessTokenExpiresAt),
    refreshToken: pair.refreshToken,
    refreshTokenExpiresAt: timestampFromDate(pair.refreshTokenExpiresAt),
    tokenType: "Bearer",
  };
}
