import type { Clock } from "../clock.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { SqlRunner } from "../storage/sql.js";
import { toBool, toMillis } from "../storage/sql.js";
import type { ApiTokenKind } from "../storage/token-entities.js";
import type { BearerVerifier } from "./authenticator.js";
import type { LastUsedTracker } from "./last-used.js";
import type { Principal } from "./principal.js";
import { intersectScopes, parseScopeString } from "./scopes.js";
import type { VerifiedSecretCache } from "./secret-cache.js";
import { parseToken } from "./token-format.js";

/** The table of personal access tokens and API keys (also the LastUsedTracker target). */
export const API_TOKENS_TABLE = "api_tokens";

/** Options of {@link createApiTokenVerifier}. */
export interface ApiTokenVerifierOptions {
  /** Raw SQL for the one look-up per request (tests pass a counting runner). */
  sql: SqlRunner;
  /** Verified-secret cache: PBKDF2 on first use only (tests pass a counting wrapper). */
  secrets: Pick<VerifiedSecretCache, "verify" | "knows">;
  lastUsed: Pick<LastUsedTracker, "mark">;
  /** `auth.tokens.patPrefix` */
  patPrefix: string;
  /** `auth.tokens.apiKeyPrefix` */
  apiKeyPrefix: string;
  /**
   * Prefixes of other opaque tokens (machine tokens, …). A token starting with one of
   * them is left to its own verifier even when one of ours is a prefix of it
   * (e.g. `pfy_` and `pfy_mu_`).
   */
  otherPrefixes?: readonly string[];
  /** The clock expiries are checked against (default: the machine's; tests pass a manual one). */
  now?: Clock;
}

interface TokenRow {
  id: string;
  kind: string;
  tenant_id: string;
  owner_user_id: string;
  scopes: string;
  secret_hash: string;
  expires_at: unknown;
  revoked_at: unknown;
  username: string;
  user_created_at: unknown;
  user_tenant_id: string;
  user_scopes: string;
  user_disabled: unknown;
  tenant_disabled: unknown;
}

/**
 * One indexed look-up (unique `public_id`) that brings the token, its owner and the
 * owner's tenant: everything the decision needs, as current on every request (the state
 * cache answering it is emptied by any change first: see SqlRunner.cachedGet).
 */
const SELECT_TOKEN =
  "select k.id, k.kind, k.tenant_id, k.owner_user_id, k.scopes, k.secret_hash, k.expires_at, k.revoked_at, " +
  "u.username, u.created_at as user_created_at, u.tenant_id as user_tenant_id, u.scopes as user_scopes, u.disabled as user_disabled, " +
  "t.disabled as tenant_disabled " +
  "from api_tokens k join users u on u.id = k.owner_user_id join tenants t on t.id = u.tenant_id " +
  "where k.public_id = ?";

const UNKNOWN = "token is not recognised";

/** Effective scopes per row read (the state cache hands out the same frozen row until it changes). */
const scopesOfRow = new WeakMap<TokenRow, string[]>();

/** The token's scopes cut down to what its owner holds now. */
function effectiveScopes(row: TokenRow): string[] {
  let scopes = scopesOfRow.get(row);
  if (scopes === undefined) {
    scopes = Object.freeze(
      intersectScopes(parseScopeString(row.scopes), parseScopeString(row.user_scopes)),
    ) as string[];
    scopesOfRow.set(row, scopes);
  }
  return scopes;
}

/**
 * Bearer verifier for personal access tokens and API keys, presented as
 * `Authorization: Bearer` or `X-API-Key`.
 *
 * Cheapest check first, so that nothing bad reaches PBKDF2:
 * 1. the prefix (not ours → null, another verifier may know it);
 * 2. length, alphabet and CRC32 checksum (a typo → TOKEN_INVALID, no database, no PBKDF2);
 * 3. one SQL query by public id, joined with owner and tenant (unknown → TOKEN_INVALID,
 *    no PBKDF2); kind must match the prefix; revoked → TOKEN_REVOKED; expired →
 *    TOKEN_EXPIRED; owner or tenant disabled → PRINCIPAL_DISABLED. A deleted owner
 *    deletes its tokens (ON DELETE CASCADE), so its tokens are unknown from then on.
 *    These states are told apart before the secret is checked: that costs no PBKDF2
 *    for a dead token, and reveals a state only to someone holding the token's
 *    16-character public id, which is shown nowhere but inside the token;
 * 4. the secret against the stored PBKDF2 hash through the {@link VerifiedSecretCache}:
 *    ~200 ms off the event loop on first use, an HMAC afterwards.
 *
 * Because step 3 runs on every request, revocation, expiry and owner changes apply to
 * the very next request whatever the cache holds. The token's scopes are intersected
 * with the owner's current scopes, and the use is marked for the coalesced
 * `last_used_at` write.
 */
export function createApiTokenVerifier(options: ApiTokenVerifierOptions): BearerVerifier {
  const { sql, secrets, lastUsed, patPrefix, apiKeyPrefix } = options;
  if (patPrefix === apiKeyPrefix) {
    throw new Error("auth.tokens.patPrefix and auth.tokens.apiKeyPrefix must differ");
  }
  const now = options.now ?? Date.now;
  const kindOf = new Map<string, ApiTokenKind>([
    [patPrefix, "pat"],
    [apiKeyPrefix, "api_key"],
  ]);
  // Longest first, so that of two nested prefixes the more specific one wins.
  const prefixes = [...new Set([patPrefix, apiKeyPrefix, ...(options.otherPrefixes ?? [])])].sort(
    (a, b) => b.length - a.length,
  );

  /** The token's id and secret when it is one of ours (null: another verifier's). @throws TesseraError TOKEN_INVALID when malformed */
  function ours(token: string): { id: string; secret: string; kind: ApiTokenKind } | null {
    const prefix = prefixes.find((p) => token.startsWith(p));
    if (prefix === undefined) return null;
    const kind = kindOf.get(prefix);
    if (kind === undefined) return null; // another verifier's token
    const parsed = parseToken(token, [prefix]);
    if (parsed === null || parsed === "malformed") {
      throw new TesseraError("TOKEN_INVALID", "token is malformed (checksum or length mismatch)");
    }
    return { id: parsed.id, secret: parsed.secret, kind };
  }

  /** Refuse a row that may not authenticate now, before its secret is looked at (step 3). */
  function assertUsable(row: TokenRow | undefined, kind: ApiTokenKind): asserts row is TokenRow {
    // A token of the other kind with a matching id is as unknown as no row at all.
    if (!row || row.kind !== kind || row.tenant_id !== row.user_tenant_id) {
      throw new TesseraError("TOKEN_INVALID", UNKNOWN);
    }
    if (toMillis(row.revoked_at) !== null) throw new TesseraError("TOKEN_REVOKED", "token has been revoked");
    const expiresAt = toMillis(row.expires_at);
    if (expiresAt !== null && expiresAt <= now()) {
      throw new TesseraError("TOKEN_EXPIRED", "token has expired");
    }
    if (toBool(row.user_disabled)) throw new TesseraError("PRINCIPAL_DISABLED", "user is disabled");
    if (toBool(row.tenant_disabled)) throw new TesseraError("PRINCIPAL_DISABLED", "tenant is disabled");
  }

  /** The principal of a row whose secret matched; marks the use. */
  function accepted(row: TokenRow, state: RequestState): Principal {
    lastUsed.mark(API_TOKENS_TABLE, row.id);
    // The owner as this query read it: GetCurrentUser answers from it without a second read.
    state.user = {
      id: row.owner_user_id,
      username: row.username,
      tenantId: row.user_tenant_id,
      createdAt: toMillis(row.user_created_at) ?? 0,
    };
    return {
      kind: "user",
      method: row.kind === "pat" ? "pat" : "api_key",
      id: row.owner_user_id,
      tenantId: row.user_tenant_id,
      username: row.username,
      scopes: effectiveScopes(row),
      credentialId: row.id,
      certificate: state.certificate,
    };
  }

  return {
    name: "api-token",
    // The same steps as `verify`, for a token whose secret the cache already knows and whose
    // row is read synchronously (SQLite): decided without a promise, so that admission needs
    // no no-hashing scope for it (src/admission/). Anything else: undefined, and `verify`.
    verifyNow(token: string, state: RequestState): Principal | null | undefined {
      const presented = ours(token);
      if (presented === null) return null;
      const read = sql.sync;
      if (read === undefined) return undefined;
      const row = read.cachedGet<TokenRow>(SELECT_TOKEN, [presented.id]);
      assertUsable(row, presented.kind);
      if (!secrets.knows(`token:${row.id}`, presented.secret, row.secret_hash)) return undefined;
      return accepted(row, state);
    },
    async verify(token: string, state: RequestState): Promise<Principal | null> {
      const presented = ours(token);
      if (presented === null) return null;
      const row = await sql.cachedGet<TokenRow>(SELECT_TOKEN, [presented.id]);
      assertUsable(row, presented.kind);
      // Only now the expensive part: a refused token never costs PBKDF2.
      if (!(await secrets.verify(`token:${row.id}`, presented.secret, row.secret_hash))) {
        throw new TesseraError("TOKEN_INVALID", UNKNOWN);
      }
      return accepted(row, state);
    },
  };
}
