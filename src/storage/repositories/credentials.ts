import { type Awaitable, andThen } from "../../auth/awaitable.js";
import type { SharedDigest } from "../../auth/secret-cache.js";
import type { Storage } from "../orm.js";
import { oncePerRow } from "../row-cache.js";
import { type SqlRunner, toBool, toMillis, toScopes } from "../sql.js";
import type { ApiTokenKind } from "../token-entities.js";
import { digestOf, sharedDigest } from "./shared-digests.js";

/** A personal access token or API key joined with its owner and the owner's tenant. */
export interface ApiTokenState {
  id: string;
  kind: ApiTokenKind | string;
  tenantId: string;
  ownerUserId: string;
  /** The token's own scopes (not yet cut down to its owner's). */
  scopes: string[];
  secretHash: string;
  /** The shared digest of the secret, once some instance verified it (see VerifiedSecretCache). */
  verifiedDigest: string | null;
  expiresAt: number | null;
  revoked: boolean;
  username: string;
  userCreatedAt: number;
  userTenantId: string;
  userScopes: string[];
  userDisabled: boolean;
  tenantDisabled: boolean;
}

interface TokenRow {
  id: string;
  kind: string;
  tenant_id: string;
  owner_user_id: string;
  scopes: string;
  secret_hash: string;
  verified_digest: string | null;
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
const TOKEN_BY_PUBLIC_ID =
  "select k.id, k.kind, k.tenant_id, k.owner_user_id, k.scopes, k.secret_hash, k.verified_digest, k.expires_at, k.revoked_at, " +
  "u.username, u.created_at as user_created_at, u.tenant_id as user_tenant_id, u.scopes as user_scopes, u.disabled as user_disabled, " +
  "t.disabled as tenant_disabled " +
  "from api_tokens k join users u on u.id = k.owner_user_id join tenants t on t.id = u.tenant_id " +
  "where k.public_id = ?";

/** A token row's state, frozen: every request authenticated by the same cached row shares it. */
const tokenState = oncePerRow(
  (row: TokenRow): ApiTokenState => ({
    id: row.id,
    kind: row.kind,
    tenantId: row.tenant_id,
    ownerUserId: row.owner_user_id,
    scopes: toScopes(row.scopes),
    secretHash: row.secret_hash,
    verifiedDigest: row.verified_digest,
    expiresAt: toMillis(row.expires_at),
    revoked: toMillis(row.revoked_at) !== null,
    username: row.username,
    userCreatedAt: toMillis(row.user_created_at) ?? 0,
    userTenantId: row.user_tenant_id,
    userScopes: toScopes(row.user_scopes),
    userDisabled: toBool(row.user_disabled),
    tenantDisabled: toBool(row.tenant_disabled),
  }),
);

function toToken(row: TokenRow | undefined): ApiTokenState | null {
  return row ? tokenState(row) : null;
}

/** Tables whose `last_used_at` {@link CredentialRepository.markUsed} may write. */
export type LastUsedTable = "api_tokens" | "machine_users" | "machine_credentials";

const MARK_USED: Record<LastUsedTable, string> = {
  api_tokens: markUsedSql("api_tokens"),
  machine_users: markUsedSql("machine_users"),
  machine_credentials: markUsedSql("machine_credentials"),
};

/** Never moves the time backwards when several instances write it. */
function markUsedSql(table: LastUsedTable): string {
  return `update ${table} set last_used_at = ? where id = ? and (last_used_at is null or last_used_at < ?)`;
}

/** Credential rows: the per-request token look-up and the coalesced last-used writes. */
export class CredentialRepository {
  constructor(private readonly sql: SqlRunner) {}

  /**
   * The personal access token or API key whose public id is `publicId`, with its owner;
   * synchronously when the state cache answers (see SqlRunner.cachedGet).
   */
  apiToken(publicId: string): Awaitable<ApiTokenState | null> {
    return andThen(this.sql.cachedGet<TokenRow>(TOKEN_BY_PUBLIC_ID, [publicId]), toToken);
  }

  /** The shared digest of a token's secret (generated, high-entropy: see VerifiedSecretCache). */
  sharedDigest(token: ApiTokenState): SharedDigest {
    return sharedDigest(this.sql, "api_tokens", token.id, token);
  }

  /** The digest known for a token read. */
  digestOf(token: ApiTokenState): string | null {
    return digestOf(token);
  }

  /** Set a credential's `last_used_at` to `at` unless it already holds a later time. */
  async markUsed(table: LastUsedTable, id: string, at: Date): Promise<void> {
    await this.sql.run(MARK_USED[table], [at, id, at]);
  }
}

/** The tables whose rows carry a shared digest (`verified_digest`). */
const DIGEST_TABLES = ["api_tokens", "machine_credentials"] as const;

/** Rows one statement of {@link clearSharedDigests} clears: short statements, under any statement bound. */
const CLEAR_DIGESTS_BATCH = 5_000;

/**
 * Forget every shared digest (a master-key rotation: they were keyed with the previous
 * key's derivation). In batches, so that no statement holds many row locks or runs into
 * the per-statement bound; idempotent, and a concurrent verification that stores a new
 * digest meanwhile stores one under the key it holds. Returns the digests cleared.
 */
export async function clearSharedDigests(storage: Storage): Promise<number> {
  const conn = storage.em.getConnection();
  let cleared = 0;
  for (const table of DIGEST_TABLES) {
    const sql =
      `update ${table} set verified_digest = null where id in ` +
      `(select id from ${table} where verified_digest is not null limit ${CLEAR_DIGESTS_BATCH})`;
    for (;;) {
      const res = (await conn.execute(sql, [], "run")) as { affectedRows?: number };
      const n = res.affectedRows ?? 0;
      cleared += n;
      if (n < CLEAR_DIGESTS_BATCH) break;
    }
  }
  return cleared;
}
