import type { Clock } from "../clock.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { ApiTokenState, CredentialRepository } from "../storage/repositories/credentials.js";
import { oncePerRow } from "../storage/row-cache.js";
import type { ApiTokenKind } from "../storage/token-entities.js";
import type { BearerVerifier } from "./authenticator.js";
import type { LastUsedTracker } from "./last-used.js";
import { type Principal, TENANT_DISABLED_MESSAGE, walledOff } from "./principal.js";
import { intersectScopes } from "./scopes.js";
import type { VerifiedSecretCache } from "./secret-cache.js";
import { storedSecretVerifier } from "./stored-secret.js";
import { parseToken } from "./token-format.js";

/** The table of personal access tokens and API keys (also the LastUsedTracker target). */
export const API_TOKENS_TABLE = "api_tokens" as const;

/** Options of {@link createApiTokenVerifier}. */
export interface ApiTokenVerifierOptions {
  /** The one look-up per request (tests pass one over a counting SQL runner). */
  credentials: Pick<CredentialRepository, "apiToken" | "sharedDigest" | "digestOf">;
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

const UNKNOWN = "token is not recognised";

/** The token's scopes cut down to what its owner holds now (once per token state: the repository hands out the same one until the row changes). */
const effectiveScopes = oncePerRow((token: ApiTokenState): string[] =>
  intersectScopes(token.scopes, token.userScopes),
);

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
 *    a PBKDF2 (slow by design) off the event loop on first use, an HMAC afterwards.
 *
 * Because step 3 runs on every request, revocation, expiry and owner changes apply to
 * the very next request whatever the cache holds. The token's scopes are intersected
 * with the owner's current scopes, and the use is marked for the coalesced
 * `last_used_at` write.
 */
export function createApiTokenVerifier(options: ApiTokenVerifierOptions): BearerVerifier {
  const { credentials, secrets, lastUsed, patPrefix, apiKeyPrefix } = options;
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

  /** Refuse a token that may not authenticate now, before its secret is looked at (step 3). */
  function assertUsable(
    token: ApiTokenState | null,
    state: RequestState,
    { kind }: { kind: ApiTokenKind },
  ): asserts token is ApiTokenState {
    // A token of the other kind with a matching id is as unknown as no row at all, and so
    // is one behind a verification's tenant wall.
    if (
      !token ||
      token.kind !== kind ||
      token.tenantId !== token.userTenantId ||
      walledOff(state, token.tenantId)
    ) {
      throw new TesseraError("TOKEN_INVALID", UNKNOWN);
    }
    if (token.revoked) throw new TesseraError("TOKEN_REVOKED", "token has been revoked");
    if (token.expiresAt !== null && token.expiresAt <= now()) {
      throw new TesseraError("TOKEN_EXPIRED", "token has expired");
    }
    if (token.userDisabled) throw new TesseraError("PRINCIPAL_DISABLED", "user is disabled");
    if (token.tenantDisabled) throw new TesseraError("PRINCIPAL_DISABLED", TENANT_DISABLED_MESSAGE);
  }

  /**
   * The principal and owner last made from each token row, with the certificate they were
   * made with: the state cache hands out the same frozen row until it changes, so a token
   * seen before gets the same frozen objects back instead of two new ones per call.
   */
  const made = new WeakMap<
    ApiTokenState,
    { certificate: unknown; principal: Principal; user: NonNullable<RequestState["user"]> }
  >();

  /** The principal of a token whose secret matched; marks the use. */
  function accepted(token: ApiTokenState, state: RequestState): Principal {
    lastUsed.mark(API_TOKENS_TABLE, token.id);
    const last = made.get(token);
    if (last !== undefined && last.certificate === state.certificate) {
      state.user = last.user;
      return last.principal;
    }
    // The owner as this query read it: GetCurrentUser answers from it without a second read.
    const user = Object.freeze({
      id: token.ownerUserId,
      username: token.username,
      tenantId: token.userTenantId,
      createdAt: token.userCreatedAt,
    });
    const principal: Principal = Object.freeze({
      kind: "user",
      method: token.kind === "pat" ? "pat" : "api_key",
      id: token.ownerUserId,
      tenantId: token.userTenantId,
      username: token.username,
      // Shared by every call with this token: frozen to the list too.
      scopes: Object.freeze(effectiveScopes(token)),
      credentialId: token.id,
      certificate: state.certificate,
      expiresAt: token.expiresAt,
    });
    made.set(token, { certificate: state.certificate, principal, user });
    state.user = user;
    return principal;
  }

  return storedSecretVerifier(secrets, credentials, {
    name: "api-token",
    ours,
    read: (presented) => credentials.apiToken(presented.id),
    assertUsable,
    namespace: (token) => `token:${token.id}`,
    accepted,
    unknown: UNKNOWN,
  });
}
