import type { SharedDigest } from "../../auth/secret-cache.js";
import type { SqlRunner } from "../sql.js";

/** Tables whose rows carry a `verified_digest` of their secret (see VerifiedSecretCache). */
export type DigestTable = "api_tokens" | "machine_credentials";

/** A credential's state as read: the hash its digest is bound to, and the digest the read brought. */
interface DigestedState {
  readonly secretHash: string;
  readonly verifiedDigest: string | null;
}

const STATEMENTS: Record<DigestTable, { read: string; store: string }> = {
  api_tokens: digestSql("api_tokens"),
  machine_credentials: digestSql("machine_credentials"),
};

/**
 * The stored digest read past the state cache (see SharedDigest.fresh), and its store,
 * bound to the hash it was computed with: a digest for a hash replaced meanwhile is not stored.
 */
function digestSql(table: DigestTable): { read: string; store: string } {
  return {
    read: `select verified_digest from ${table} where id = ?`,
    store: `update ${table} set verified_digest = ? where id = ? and secret_hash = ?`,
  };
}

/**
 * Digests stored or read after a credential's row was: storing one empties no state cache,
 * so the row a cache keeps may predate it, and without this every later miss on it would
 * read the digest again. Held per state object (one per cached row or row list), whose
 * stored hash the digest is bound to.
 */
const learntDigests = new WeakMap<DigestedState, string>();

/** The digest known for a credential's state. */
export function digestOf(state: DigestedState): string | null {
  return learntDigests.get(state) ?? state.verifiedDigest;
}

/** The shared digest of the secret of the row `id` of `table`, read as `state`. */
export function sharedDigest(
  sql: SqlRunner,
  table: DigestTable,
  id: string,
  state: DigestedState,
): SharedDigest {
  const { read, store } = STATEMENTS[table];
  return {
    stored: digestOf(state),
    fresh: async () => {
      const found = (await sql.get<{ verified_digest: string | null }>(read, [id]))?.verified_digest;
      if (found) learntDigests.set(state, found);
      return found ?? null;
    },
    save: async (digest) => {
      await sql.run(store, [digest, id, state.secretHash]);
      learntDigests.set(state, digest);
    },
  };
}
