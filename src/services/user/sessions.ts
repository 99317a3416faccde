import { createHash, randomBytes, randomUUID } from "node:crypto";
import type { EntityManager } from "@mikro-orm/knex";
import { assertMayManage, NEW_PRINCIPAL } from "../../auth/authority.js";
import type { JwtService } from "../../auth/jwt.js";
import { TENANT_DISABLED_MESSAGE } from "../../auth/principal.js";
import { parseScopeString } from "../../auth/scopes.js";
import { SESSION_LIFETIME_OVER, sessionEnd } from "../../auth/session-end.js";
import { type Clock, systemClock } from "../../clock.js";
import { REFRESH_TOKEN_PREFIX } from "../../config/auth.js";
import { TesseraError } from "../../errors.js";
import { RefreshToken, Session, Tenant, User } from "../../storage/entities.js";
import { lockUser } from "../../storage/lock-order.js";
import { ApiToken } from "../../storage/token-entities.js";

// Prefix of refresh tokens: opaque, never a JWT, so they can never pass as access tokens.
export { REFRESH_TOKEN_PREFIX };

/** A freshly issued access + refresh token pair. */
export interface TokenPair {
  accessToken: string;
  accessTokenExpiresAt: Date;
  refreshToken: string;
  refreshTokenExpiresAt: Date;
  /** The access token's scopes (its `scope` claim). */
  scopes: readonly string[];
}

/** How a refresh token is found: its SHA-256 (the table keeps only that). */
export function hashRefreshToken(token: string): string {
  // 256 random bits: a fast hash is enough; a slow one would protect nothing more.
  return createHash("sha256").update(token).digest("hex");
}

/** The shape of the refresh tokens {@link SessionIssuer.issue} makes: the prefix and 32 random bytes, base64url. */
const REFRESH_TOKEN_SHAPE = new RegExp(`^${REFRESH_TOKEN_PREFIX}[A-Za-z0-9_-]{43}$`);

/** Whether `token` has the shape of an issued refresh token (one of any other matches no row). */
export function isRefreshTokenShaped(token: string): boolean {
  return REFRESH_TOKEN_SHAPE.test(token);
}

/** Issues and rotates user sessions (access JWT + rotating refresh token). */
export class SessionIssuer {
  constructor(
    private readonly jwt: JwtService,
    private readonly refreshTtlSeconds: number,
    /** The clock of refresh-token expiries (tests pass a manual one). */
    private readonly now: Clock = systemClock,
    /**
     * `auth.sessionMaxLifetime`: a session ends this long after its login however often it
     * is refreshed (no token it issues outlives that); 0: no bound.
     */
    private readonly maxLifetimeSeconds = 0,
  ) {}

  /**
   * When a session that began at `startedAt` (ms) must end, as ms; infinite with no bound.
   * Computed here from the session row's `created_at` on every instance, nothing stored:
   * instances configured alike decide alike, and a changed bound applies to every session.
   */
  private endOf(startedAt: number): number {
    return sessionEnd(startedAt, this.maxLifetimeSeconds);
  }

  /** When session `familyId` must end (ms; infinite with no bound), from {@link startOf}. */
  private async sessionEndOf(em: EntityManager, familyId: string): Promise<number> {
    if (this.maxLifetimeSeconds === 0) return Number.POSITIVE_INFINITY;
    return this.endOf(await this.startOf(em, familyId, await em.findOne(Session, { id: familyId })));
  }

  /**
   * When session `familyId` began: its row's `created_at`, or for a family an instance from
   * before sessions opened (no row yet) its first refresh token's creation, as the sessions
   * migration's backfill reads it.
   */
  private async startOf(em: EntityManager, familyId: string, session: Session | null): Promise<number> {
    if (session) return session.createdAt.getTime();
    const [first] = await em.find(RefreshToken, { familyId }, { orderBy: { createdAt: "asc" }, limit: 1 });
    return first ? first.createdAt.getTime() : this.now();
  }

  /**
   * Why unspent refresh token `row` is over at `now`, if it is: expired, or its session past its
   * absolute end. Either is only that, never a re-use: refused unspent (spent, the client's
   * retry read as a theft and ended the session with its live access tokens), with the same
   * reason, TOKEN_EXPIRED. Tokens issued under the bound expire with their session; those
   * issued before it was set (or lowered) may outlive it. A token spent before it expired is
   * still a re-use, whenever it comes back.
   */
  private async expiryOf(em: EntityManager, row: RefreshToken, now: number): Promise<string | undefined> {
    if (row.expiresAt.getTime() <= now) return "refresh token expired";
    if ((await this.sessionEndOf(em, row.familyId)) <= now) return SESSION_LIFETIME_OVER;
    return undefined;
  }

  /**
   * Issue a pair for `user`; `familyId` continues a rotation family (a session), else a
   * new session is opened. The access token names its session (`sid`), so ending the
   * session refuses it too. `samePassword`: whether the password that opens a new session
   * (Login's) matches a stored hash (see {@link userStands}).
   */
  async issue(
    em: EntityManager,
    user: User,
    familyId?: string,
    scopes: readonly string[] = parseScopeString(user.scopes),
    samePassword?: (stored: string) => Promise<boolean>,
  ): Promise<TokenPair> {
    const sessionId = familyId ?? randomUUID();
    let opened = familyId === undefined;
    const issuedAt = this.now();
    let startedAt = issuedAt;
    if (familyId !== undefined) {
      // Read again, not from the identity map: rotate() read the row before its transaction
      // (the session's end), and a logout committed since must be seen here.
      const session = await em.findOne(Session, { id: familyId }, { refresh: true });
      if (session?.revokedAt) throw new TesseraError("TOKEN_REVOKED", "the session has ended");
      // A family opened by an instance that predates sessions (after the migration's
      // backfill): give it its row, so that its new access tokens can be checked.
      opened = !session;
      startedAt = await this.startOf(em, familyId, session);
    }
    const end = this.endOf(startedAt);
    // rotate() refused this before spending; reached meanwhile (its transaction then rolls the
    // spend back, so the token stays unspent as an expired one).
    if (end <= issuedAt) throw new TesseraError("TOKEN_EXPIRED", SESSION_LIFETIME_OVER);
    if (opened)
      em.create(Session, {
        id: sessionId,
        userId: user.id,
        createdAt: new Date(startedAt),
        revokedAt: null,
      });
    const access = await this.jwt.issue({
      subject: user.id,
      tenantId: user.tenantId,
      scopes: [...scopes],
      kind: "user",
      username: user.username,
      sessionId,
      ...(end < Number.POSITIVE_INFINITY ? { expiresBy: new Date(end) } : {}),
    });
    const refreshToken = REFRESH_TOKEN_PREFIX + randomBytes(32).toString("base64url");
    // Never past the session's end: a refresh token kept warm dies with its session.
    const refreshTokenExpiresAt = new Date(Math.min(issuedAt + this.refreshTtlSeconds * 1000, end));
    em.create(RefreshToken, {
      id: randomUUID(),
      familyId: sessionId,
      userId: user.id,
      tokenHash: hashRefreshToken(refreshToken),
      createdAt: new Date(issuedAt),
      expiresAt: refreshTokenExpiresAt,
      spentAt: null,
      revokedAt: null,
    });
    await em.flush();
    // A password change, reset or disable that committed after `user` was read (during a
    // login's PBKDF2, slow by design) ended the user's sessions before this one existed: it must
    // not survive them. Either the change comes before this read (seen here) or its
    // revocation after the insert above (and covers this session).
    let stands = !opened;
    try {
      stands ||= await this.userStands(em, user, samePassword);
    } finally {
      if (!stands) await this.revokeFamily(em, sessionId);
    }
    if (!stands) {
      throw familyId === undefined
        ? new TesseraError("CREDENTIALS_INVALID", "invalid username or password")
        : new TesseraError("TOKEN_REVOKED", "the session has ended");
    }
    return {
      accessToken: access.token,
      accessTokenExpiresAt: access.expiresAt,
      refreshToken,
      refreshTokenExpiresAt,
      scopes: [...scopes],
    };
  }

  /**
   * Whether `user`, read before its new session was opened, may still have it: enabled, with
   * the password read. A hash changed meanwhile is a password changed, unless `samePassword`
   * matches the new one: a re-hash of this very password at the current iterations
   * (auth/password-upgrade.ts) by a concurrent login, on any instance, changes no password.
   */
  private async userStands(
    em: EntityManager,
    user: User,
    samePassword: ((stored: string) => Promise<boolean>) | undefined,
  ): Promise<boolean> {
    if (await em.count(User, { id: user.id, passwordHash: user.passwordHash, disabled: false })) return true;
    if (samePassword === undefined) return false;
    // A fork: the request's identity map holds the row as read before.
    const now = await em.fork().findOne(User, { id: user.id, disabled: false }, { fields: ["passwordHash"] });
    return now !== null && now.passwordHash !== user.passwordHash && (await samePassword(now.passwordHash));
  }

  /**
   * Spend a refresh token for a new pair. Re-use of a spent token (a sign it was stolen)
   * revokes the whole family and its session, so both the thief and the victim must log
   * in again: the access tokens either was issued are refused from the next request.
   *
   * `options.scopes`: the new access token carries only these (the OAuth 2.0 refresh_token
   * grant's `scope`, RFC 6749 §6), which the user must still hold (assertMayManage's rule:
   * ACCESS_DENIED or INVALID_ARGUMENT otherwise, decided before the token is spent, so a
   * refused narrowing costs the client nothing). The session keeps the user's scopes.
   * `options.owner`: the user the token must belong to (a client that authenticated),
   * else TOKEN_INVALID, before it is spent.
   * `options.resolved`: told the token's user once known (the audit record's target), a
   * re-use included: the record of a theft names whose session it was.
   */
  async rotate(
    em: EntityManager,
    refreshToken: string,
    options: {
      scopes?: readonly string[];
      owner?: string;
      resolved?: (user: { id: string; tenantId: string }) => void;
    } = {},
  ): Promise<TokenPair> {
    const row = refreshToken.startsWith(REFRESH_TOKEN_PREFIX)
      ? await em.findOne(RefreshToken, { tokenHash: hashRefreshToken(refreshToken) })
      : null;
    if (!row || (options.owner !== undefined && row.userId !== options.owner))
      throw new TesseraError("TOKEN_INVALID", "refresh token is invalid");
    if (row.revokedAt) throw new TesseraError("TOKEN_REVOKED", "refresh token has been revoked");
    const now = new Date(this.now());
    const expired = row.spentAt ? undefined : await this.expiryOf(em, row, now.getTime());
    const user = await em.findOne(User, { id: row.userId });
    if (expired !== undefined) {
      // The record names whose session ended, as a re-use's names whose was stolen.
      if (user) options.resolved?.(user);
      throw new TesseraError("TOKEN_EXPIRED", expired);
    }
    if (!row.spentAt && user) {
      if (options.scopes !== undefined)
        assertMayManage({ scopes: parseScopeString(user.scopes) }, NEW_PRINCIPAL, options.scopes);
      // Refused before it is spent: disabling a tenant ends none of its sessions, and a
      // refresh refused meanwhile must not make the client's next one (once the tenant is
      // enabled again) a re-use that ends its session.
      const tenant = await em.findOne(Tenant, { id: user.tenantId });
      if (user.disabled || !tenant || tenant.disabled) {
        options.resolved?.(user);
        throw new TesseraError(
          "PRINCIPAL_DISABLED",
          user.disabled ? "user is disabled" : TENANT_DISABLED_MESSAGE,
        );
      }
    }
    // Spent and replaced in one transaction: a write failing in between (the database gone
    // mid-refresh) must leave the token unspent, or the client's retry reads as a re-use.
    const outcome = await em.transactional(async (tx) => {
      // The user's row before the token's (storage/lock-order.ts): a DeleteUser, which takes
      // them in that order, deadlocked with a refresh that spent its token first.
      if (user && !(await lockUser(tx, user.id))) return "gone";
      // Conditional update: of two concurrent uses exactly one wins; the other is a re-use.
      const spent = row.spentAt
        ? 0
        : await tx.nativeUpdate(RefreshToken, { id: row.id, spentAt: null }, { spentAt: now });
      if (spent === 0) return "reused";
      if (!user) return "gone";
      options.resolved?.(user);
      return this.issue(tx, user, row.familyId, options.scopes);
    });
    if (outcome === "reused") {
      await this.revokeFamily(em, row.familyId);
      if (user) options.resolved?.(user);
      throw new TesseraError("TOKEN_REVOKED", "refresh token was already used; the session has been revoked");
    }
    if (outcome === "gone") throw new TesseraError("TOKEN_REVOKED", "the session's user no longer exists");
    const pair = outcome;
    // A concurrent re-use of the same token may have revoked the family between our
    // conditional update and the insert above. Either it revoked before this check (seen
    // here) or after the insert (its update then covers the new row too): the winner of
    // a race with a thief never keeps a live session.
    if ((await em.count(RefreshToken, { familyId: row.familyId, revokedAt: { $ne: null } })) > 0) {
      await this.revokeFamily(em, row.familyId);
      throw new TesseraError("TOKEN_REVOKED", "refresh token was already used; the session has been revoked");
    }
    return pair;
  }

  /**
   * Revoke the family of a refresh token; unknown tokens are ignored (logout is idempotent).
   * `resolved`: told the token's user (the audit record's target).
   */
  async logout(
    em: EntityManager,
    refreshToken: string,
    resolved?: (user: { id: string; tenantId: string }) => void,
  ): Promise<void> {
    if (!refreshToken.startsWith(REFRESH_TOKEN_PREFIX)) return;
    const row = await em.findOne(RefreshToken, { tokenHash: hashRefreshToken(refreshToken) });
    if (!row) return;
    await this.revokeFamily(em, row.familyId);
    if (resolved) {
      const user = await em.findOne(User, { id: row.userId });
      if (user) resolved(user);
    }
  }

  /**
   * End one session: its access tokens first (they are what an attacker holds), then its refresh
   * tokens; `sessionEnded` is called between the two writes (for an audit that names what committed).
   */
  async revokeFamily(em: EntityManager, familyId: string, sessionEnded?: () => void): Promise<void> {
    const now = new Date(this.now());
    await em.nativeUpdate(Session, { id: familyId, revokedAt: null }, { revokedAt: now });
    sessionEnded?.();
    await em.nativeUpdate(RefreshToken, { familyId, revokedAt: null }, { revokedAt: now });
  }

  /** End every session of a user (password change or reset, disable). */
  async revokeUser(em: EntityManager, userId: string): Promise<void> {
    const now = new Date(this.now());
    await em.nativeUpdate(Session, { userId, revokedAt: null }, { revokedAt: now });
    await em.nativeUpdate(RefreshToken, { userId, revokedAt: null }, { revokedAt: now });
  }

  /**
   * Revoke a user's personal access tokens and API keys (`revoke_tokens` of a password
   * change or reset). Their rows are read on every request, so this applies at once.
   */
  async revokeUserTokens(em: EntityManager, userId: string): Promise<void> {
    await em.nativeUpdate(
      ApiToken,
      { ownerUserId: userId, revokedAt: null },
      { revokedAt: new Date(this.now()) },
    );
  }
}
