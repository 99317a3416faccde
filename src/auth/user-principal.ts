import { DEFAULT_TENANT_NAME } from "../bootstrap.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { SqlRunner } from "../storage/sql.js";
import { toBool, toMillis } from "../storage/sql.js";
import type { BasicVerifier, ClaimsLoader } from "./authenticator.js";
import type { AccessTokenClaims } from "./jwt.js";
import { dummyPasswordHash, verifySecret } from "./password.js";
import type { Principal } from "./principal.js";
import { intersectScopes, parseScopeString } from "./scopes.js";
import type { VerifiedSecretCache } from "./secret-cache.js";

/** A user's current state as the authentication path needs it. */
export interface UserAuthState {
  id: string;
  username: string;
  tenantId: string;
  scopes: string[];
  disabled: boolean;
  tenantDisabled: boolean;
  passwordHash: string;
  createdAt: number;
  /**
   * Read with a session ({@link UserStateReader.bySession}): whether that session has
   * been revoked. Always false for a row read without one.
   */
  sessionRevoked: boolean;
}

interface UserRow {
  id: string;
  username: string;
  tenant_id: string;
  scopes: string;
  disabled: unknown;
  tenant_disabled: unknown;
  password_hash: string;
  created_at: unknown;
  /** Present only in rows read with a session. */
  session_revoked_at?: unknown;
}

const SELECT =
  "select u.id, u.username, u.tenant_id, u.scopes, u.disabled, u.password_hash, u.created_at, t.disabled as tenant_disabled " +
  "from users u join tenants t on t.id = u.tenant_id where ";
const BY_ID = `${SELECT}u.id = ?`;
/**
 * Usernames are unique per tenant. Without a tenant: the default tenant's user of that
 * name, else the one user of that name from the time usernames were global
 * (`tenantless_login`, at most one per name). Never "the oldest of any tenant": a tenant
 * admin could then create a name in its own tenant and learn, from whether a tenant-less
 * login with the password it chose works, whether another tenant holds the name. Here no
 * tenant admin can change what a tenant-less name means for a user it created (outside
 * the default tenant it never means that user; in it, always), so nothing is learnt.
 */
const BY_USERNAME =
  `${SELECT}u.username = ? and (t.name = ? or u.tenantless_login = ?) ` +
  "order by case when t.name = ? then 0 else 1 end, u.created_at, u.id limit 1";
const BY_TENANT_ID_USERNAME = `${SELECT}u.tenant_id = ? and u.username = ?`;
const BY_TENANT_NAME_USERNAME = `${SELECT}t.name = ? and u.username = ?`;

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * Whether a string that names a tenant (Login's `tenant`, HTTP Basic's `<tenant>/`) is its
 * id: a value shaped like an id is taken as one, anything else as a tenant name.
 */
export function isTenantId(value: string): boolean {
  return UUID_RE.test(value);
}

/**
 * An HTTP Basic user-id: `<tenant>/<username>` (a tenant name or id) or a plain username.
 * Split at the last "/": usernames cannot hold one (USERNAME_RE), tenant names can. A
 * tenant name holding ":" cannot be sent this way (Basic ends the user-id at the first
 * colon, RFC 7617): its id can.
 */
export function splitBasicUsername(userId: string): { tenant: string; username: string } {
  const slash = userId.lastIndexOf("/");
  return slash < 0
    ? { tenant: "", username: userId }
    : { tenant: userId.slice(0, slash), username: userId.slice(slash + 1) };
}
/**
 * The user's state and its session's, in one statement (one indexed look-up each, one
 * state-cache entry per session): checking the session costs the hot path nothing more
 * than the user's row did. An inner join: an unknown session reads as no row at all,
 * which the state cache never keeps (so inserting a session need not empty the cache,
 * see STATE_TABLES).
 */
const BY_SESSION =
  "select u.id, u.username, u.tenant_id, u.scopes, u.disabled, u.password_hash, u.created_at, " +
  "t.disabled as tenant_disabled, s.revoked_at as session_revoked_at " +
  "from users u join tenants t on t.id = u.tenant_id join sessions s on s.user_id = u.id " +
  "where u.id = ? and s.id = ?";

/** States derived from cached rows (the state cache hands out the same frozen row until it changes). */
const derived = new WeakMap<UserRow, UserAuthState>();

function toState(row: UserRow | undefined): UserAuthState | null {
  if (!row) return null;
  let state = derived.get(row);
  if (state === undefined) {
    state = deriveState(row);
    derived.set(row, state);
  }
  return state;
}

function deriveState(row: UserRow): UserAuthState {
  // Frozen: every request authenticated by the same cached row shares it.
  return Object.freeze({
    id: row.id,
    username: row.username,
    tenantId: row.tenant_id,
    scopes: Object.freeze(parseScopeString(row.scopes)) as string[],
    disabled: toBool(row.disabled),
    tenantDisabled: toBool(row.tenant_disabled),
    passwordHash: row.password_hash,
    createdAt: toMillis(row.created_at) ?? 0,
    sessionRevoked: row.session_revoked_at !== undefined && row.session_revoked_at !== null,
  });
}

/** Reads user rows with prepared statements (one indexed look-up, or the state cache: SqlRunner.cachedGet). */
export class UserStateReader {
  constructor(private readonly sql: SqlRunner) {}

  async byId(id: string): Promise<UserAuthState | null> {
    return toState(await this.sql.cachedGet<UserRow>(BY_ID, [id]));
  }

  /**
   * {@link byId} answered synchronously where the store allows it (SQLite, see
   * `SqlRunner.sync`; PostgreSQL when the state cache keeps the row, `SqlRunner.peek`);
   * undefined where it does not.
   */
  byIdNow(id: string): UserAuthState | null | undefined {
    const sync = this.sql.sync;
    if (sync !== undefined) return toState(sync.cachedGet<UserRow>(BY_ID, [id]));
    // PostgreSQL: a row the state cache keeps, else undefined (ask byId).
    const kept = this.sql.peek?.<UserRow>(BY_ID, [id]);
    return kept === undefined ? undefined : toState(kept);
  }

  /** The user `id` with the state of its session `sid`; null when either does not exist. */
  async bySession(id: string, sid: string): Promise<UserAuthState | null> {
    return toState(await this.sql.cachedGet<UserRow>(BY_SESSION, [id, sid]));
  }

  /** {@link bySession} answered synchronously where the store allows it (see {@link byIdNow}). */
  bySessionNow(id: string, sid: string): UserAuthState | null | undefined {
    const sync = this.sql.sync;
    if (sync !== undefined) return toState(sync.cachedGet<UserRow>(BY_SESSION, [id, sid]));
    const kept = this.sql.peek?.<UserRow>(BY_SESSION, [id, sid]);
    return kept === undefined ? undefined : toState(kept);
  }

  /** The user a username alone names (see {@link BY_USERNAME}). */
  async byUsername(username: string): Promise<UserAuthState | null> {
    return toState(
      await this.sql.cachedGet<UserRow>(BY_USERNAME, [
        username,
        DEFAULT_TENANT_NAME,
        true,
        DEFAULT_TENANT_NAME,
      ]),
    );
  }

  /** The user named `username` in `tenant` (its id, see {@link isTenantId}, or else its name). */
  async byTenantUsername(tenant: string, username: string): Promise<UserAuthState | null> {
    const sql = isTenantId(tenant) ? BY_TENANT_ID_USERNAME : BY_TENANT_NAME_USERNAME;
    return toState(await this.sql.cachedGet<UserRow>(sql, [tenant, username]));
  }
}

/** Refuse a user that may not act now. */
export function assertUserActive(user: UserAuthState | null): asserts user is UserAuthState {
  if (!user) throw new TesseraError("TOKEN_REVOKED", "the credential's user no longer exists");
  if (user.disabled) throw new TesseraError("PRINCIPAL_DISABLED", "user is disabled");
  if (user.tenantDisabled) throw new TesseraError("PRINCIPAL_DISABLED", "tenant is disabled");
}

/**
 * Loader for user access tokens: the user must still exist and be enabled, the token's
 * session (`sid`) must not have ended, and the token's scopes are cut down to what the
 * user still holds. Tokens without `sid` (issued before sessions were tracked) are
 * checked against the user alone.
 */
export function createUserClaimsLoader(users: UserStateReader): ClaimsLoader {
  const loader: ClaimsLoader = async (claims, state) =>
    principalOf(
      claims,
      state,
      claims.sid === undefined ? await users.byId(claims.sub) : await users.bySession(claims.sub, claims.sid),
    );
  loader.now = (claims, state) => {
    const user =
      claims.sid === undefined ? users.byIdNow(claims.sub) : users.bySessionNow(claims.sub, claims.sid);
    return user === undefined ? undefined : principalOf(claims, state, user);
  };
  return loader;

  function principalOf(
    claims: AccessTokenClaims,
    state: RequestState,
    user: UserAuthState | null,
  ): Principal {
    if (claims.sid !== undefined && !user)
      throw new TesseraError("TOKEN_REVOKED", "the session has ended or its user no longer exists");
    assertUserActive(user);
    // After the user's own state (a disabled user hears so); an ended session stays ended
    // when the user is enabled again after a disable that ended it.
    if (user.sessionRevoked) throw new TesseraError("TOKEN_REVOKED", "the session has ended");
    if (user.tenantId !== claims.tid)
      throw new TesseraError("TOKEN_INVALID", "token tenant does not match its user");
    state.user = user;
    const principal: Principal = {
      kind: "user",
      method: "jwt",
      id: user.id,
      tenantId: user.tenantId,
      username: user.username,
      scopes: intersectScopes(parseScopeString(claims.scope), user.scopes),
      certificate: state.certificate,
    };
    if (claims.jti) principal.credentialId = claims.jti;
    return principal;
  }
}

/** Options for {@link createUserBasicVerifier}. */
export interface UserBasicVerifierOptions {
  users: UserStateReader;
  secrets: VerifiedSecretCache;
  iterations: number;
  /**
   * Usernames with these prefixes belong to another verifier (machine users' "mu_"):
   * refused here at once (null) without a look-up or a dummy PBKDF2, so an unknown
   * username costs exactly one dummy PBKDF2 whichever verifier owns it.
   */
  reservedPrefixes?: readonly string[];
}

/**
 * HTTP Basic for users. PBKDF2 at 600k iterations costs ~200 ms, so verified passwords
 * are remembered by the {@link VerifiedSecretCache} against the hash they matched. Each
 * request still reads the user row: a password change, disabling or deletion applies at
 * once. Unknown usernames cost a dummy PBKDF2 so timing does not reveal which exist
 * (the authentication-failure rate limit bounds how often that can be asked for).
 */
export function createUserBasicVerifier(options: UserBasicVerifierOptions): BasicVerifier {
  return {
    name: "user-basic",
    async verify(username, password, state) {
      if (options.reservedPrefixes?.some((p) => username.startsWith(p))) return null;
      const named = splitBasicUsername(username);
      const user = named.tenant
        ? await options.users.byTenantUsername(named.tenant, named.username)
        : await options.users.byUsername(named.username);
      if (!user) {
        await verifySecret(password, await dummyPasswordHash(options.iterations));
        return null;
      }
      if (user.disabled || user.tenantDisabled) {
        // A disabled account's correct password reads exactly like a wrong one (as Login
        // answers): same reason, same message, and the same full PBKDF2 each time (the
        // verified-secret cache is bypassed, so a repeated guess is not faster when right).
        await verifySecret(password, user.passwordHash);
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      // In-process only, no shared digest: a human password is guessable, and a fast keyed
      // digest of it in the database would let whoever holds the master key and a dump test
      // guesses at HMAC speed instead of PBKDF2's. Generated tokens (~190 bits) gain nothing from that.
      if (!(await options.secrets.verify(`user:${user.id}`, password, user.passwordHash))) {
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      state.user = user;
      return {
        kind: "user",
        method: "basic",
        id: user.id,
        tenantId: user.tenantId,
        username: user.username,
        scopes: user.scopes,
        certificate: state.certificate,
      };
    },
  };
}
