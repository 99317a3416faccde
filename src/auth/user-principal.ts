import { type Clock, systemClock } from "../clock.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import {
  sessionStartOf,
  type UserAuthState,
  type UserStateRepository,
} from "../storage/repositories/subject-state.js";
import type { BasicVerifier, ClaimsLoader } from "./authenticator.js";
import { andThen } from "./awaitable.js";
import type { AccessTokenClaims } from "./jwt.js";
import { dummyPasswordHash, verifySecret } from "./password.js";
import type { PasswordUpgrader } from "./password-upgrade.js";
import { type Principal, TENANT_DISABLED_MESSAGE } from "./principal.js";
import { intersectScopes, parseScopeString } from "./scopes.js";
import type { VerifiedSecretCache } from "./secret-cache.js";
import { SESSION_LIFETIME_OVER, sessionEnd } from "./session-end.js";

export { isTenantId, type UserAuthState } from "../storage/repositories/subject-state.js";

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

/** Refuse a user that may not act now. */
export function assertUserActive(user: UserAuthState | null): asserts user is UserAuthState {
  if (!user) throw new TesseraError("TOKEN_REVOKED", "the credential's user no longer exists");
  if (user.disabled) throw new TesseraError("PRINCIPAL_DISABLED", "user is disabled");
  if (user.tenantDisabled) throw new TesseraError("PRINCIPAL_DISABLED", TENANT_DISABLED_MESSAGE);
}

/** What {@link createUserClaimsLoader} reads besides the user's state. */
export interface UserClaimsLoaderOptions {
  /** `auth.sessionMaxLifetime` (seconds): a session's tokens stop this long after its login; 0: no bound. */
  sessionMaxLifetime?: number;
  /** The clock a session's end is read against (tests pass a manual one). */
  now?: Clock;
}

/**
 * Loader for user access tokens: the user must still exist and be enabled, the token's
 * session (`sid`) must not have ended, and the token's scopes are cut down to what the
 * user still holds. A user token without `sid` is refused as an ended session's: every
 * user token Tessera mints names its session (SessionIssuer), and those minted before
 * sessions were tracked have long expired, so only a leaked signing key makes one now;
 * accepted, it would outlive every revocation of its user's sessions. A field check, before
 * any read: it costs the hot path nothing.
 *
 * Past its session's absolute end (auth/session-end.ts) a token is refused TOKEN_EXPIRED. The
 * issuer caps every token at that end, so only one an instance not enforcing it minted (an
 * older version in a rolling upgrade, or one configured with no bound) gets that far.
 */
export function createUserClaimsLoader(
  users: UserStateRepository,
  options: UserClaimsLoaderOptions = {},
): ClaimsLoader {
  const { sessionMaxLifetime = 0, now = systemClock } = options;
  /**
   * Per user row: its session's end, and the last principal made from it with the claims and
   * certificate it was made from. The state cache hands out the same frozen row, and the JWT
   * cache the same claims, until either changes, so the end is computed once per row and a
   * token seen before gets the same frozen principal back instead of a new object and scope
   * list per call. A new row (any change, or no cache) misses.
   */
  const made = new WeakMap<UserAuthState, RowMemo>();
  return (claims, state) => {
    if (claims.sid === undefined) throw new TesseraError("TOKEN_REVOKED", "the session has ended");
    return andThen(users.bySession(claims.sub, claims.sid), (row) => principalOf(claims, state, row));
  };

  function principalOf(
    claims: AccessTokenClaims,
    state: RequestState,
    user: UserAuthState | null,
  ): Principal {
    if (!user) throw new TesseraError("TOKEN_REVOKED", "the session has ended or its user no longer exists");
    assertUserActive(user);
    // After the user's own state (a disabled user hears so); an ended session stays ended
    // when the user is enabled again after a disable that ended it.
    if (user.sessionRevoked) throw new TesseraError("TOKEN_REVOKED", "the session has ended");
    if (user.tenantId !== claims.tid)
      throw new TesseraError("TOKEN_INVALID", "token tenant does not match its user");
    let memo = made.get(user);
    if (memo === undefined) {
      // A row read with a session always has its start; without one (a bug) it fails closed.
      // Parsed only with a bound: a timestamp's parse is the costliest step of a row's read.
      const end =
        sessionMaxLifetime > 0
          ? sessionEnd(sessionStartOf(user) ?? Number.NEGATIVE_INFINITY, sessionMaxLifetime)
          : Number.POSITIVE_INFINITY;
      memo = { end };
      made.set(user, memo);
    }
    // A token ending by its session's end needs no clock here: its own `exp`, checked exactly,
    // ends it first. Before the memo's principal: that one must not outlive the session either.
    let expiresAt = claims.exp * 1000;
    if (expiresAt > memo.end) {
      if (now() >= memo.end) throw new TesseraError("TOKEN_EXPIRED", SESSION_LIFETIME_OVER);
      // What is told of its end (VerifyCredential's answer a downstream service caches, a
      // WatchRevocations stream's deadline, introspection's exp) must be the session's.
      expiresAt = memo.end;
    }
    state.user = user;
    if (memo.claims === claims && memo.certificate === state.certificate && memo.principal !== undefined)
      return memo.principal;
    const principal: Principal = {
      kind: "user",
      method: "jwt",
      id: user.id,
      tenantId: user.tenantId,
      username: user.username,
      // Shared by every call with these claims: frozen to the list too.
      scopes: Object.freeze(intersectScopes(parseScopeString(claims.scope), user.scopes)),
      certificate: state.certificate,
      expiresAt,
    };
    if (claims.jti) principal.credentialId = claims.jti;
    if (typeof claims.iat === "number") principal.issuedAt = claims.iat * 1000;
    principal.sessionId = claims.sid;
    if (claims.cnf?.["x5t#S256"] !== undefined) principal.certificateBinding = claims.cnf["x5t#S256"];
    Object.freeze(principal);
    memo.claims = claims;
    memo.certificate = state.certificate;
    memo.principal = principal;
    return principal;
  }
}

/** What {@link createUserClaimsLoader} keeps per user row. */
interface RowMemo {
  /** The row's session's absolute end (epoch ms; infinite with no bound). */
  readonly end: number;
  claims?: AccessTokenClaims;
  certificate?: unknown;
  principal?: Principal;
}

/** Options for {@link createUserBasicVerifier}. */
export interface UserBasicVerifierOptions {
  users: UserStateRepository;
  secrets: VerifiedSecretCache;
  iterations: number;
  /**
   * Usernames with these prefixes belong to another verifier (machine users' "mu_"):
   * refused here at once (null) without a look-up or a dummy PBKDF2, so an unknown
   * username costs exactly one dummy PBKDF2 whichever verifier owns it.
   */
  reservedPrefixes?: readonly string[];
  /** Re-hashes a verified password whose hash has other parameters than `iterations`. */
  upgrader: PasswordUpgrader;
}

/**
 * HTTP Basic for users. PBKDF2 at 600k iterations is slow by design, so verified passwords
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
        await verifySecret(
          password,
          await dummyPasswordHash(options.iterations, state.hashingRefused),
          state.hashingRefused,
        );
        return null;
      }
      if (user.disabled || user.tenantDisabled) {
        // A disabled account's correct password reads exactly like a wrong one (as Login
        // answers): same reason, same message, and the same full PBKDF2 each time (the
        // verified-secret cache is bypassed, so a repeated guess is not faster when right),
        // an unknown name's: its hash, never upgraded while refused, may be older.
        const { hashingRefused } = state;
        const against = await options.upgrader.refusalHash(user.passwordHash, hashingRefused);
        await verifySecret(password, against, hashingRefused);
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      // In-process only, no shared digest: a human password is guessable, and a fast keyed
      // digest of it in the database would let whoever holds the master key and a dump test
      // guesses at HMAC speed instead of PBKDF2's. Generated tokens (~190 bits) gain nothing from that.
      // Nor a PBKDF2 another request started: a wrong guess costs what it costs an unknown name.
      const { hashingRefused } = state;
      if (
        !(await options.secrets.verifyOwn(`user:${user.id}`, password, user.passwordHash, hashingRefused))
      ) {
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      // Not where hashing is refused (admission's budget-free attempt, answered from the
      // cache): the re-hash is a PBKDF2 and waits for a call that reserved its budget; the
      // first use after a restart is one, since the cache starts empty.
      let read = user;
      if (hashingRefused === undefined && options.upgrader.outdated(user.passwordHash)) {
        const { id } = user;
        const upgraded = await options.upgrader.upgrade("user", id, password, user.passwordHash, (from, to) =>
          options.users.replacePasswordHash(id, from, to),
        );
        if (upgraded !== undefined) {
          // Made from this very password: the next use needs no PBKDF2 to match it.
          options.secrets.remember(`user:${id}`, password, upgraded);
          // The row as it now is: what the call made with this password is checked
          // against (assertMakerStands), and the old hash would read as a changed password.
          read = Object.freeze({ ...user, passwordHash: upgraded });
        }
      }
      state.user = read;
      state.samePassword = (stored) => verifySecret(password, stored);
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
