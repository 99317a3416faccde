import type { SigningKey } from "../entities.js";
import type { Storage } from "../orm.js";

/** The signing key rows, as {@link readSigningKeys} reads them (portable SQL). */
const KEY_ROWS_SQL =
  "select kid, alg, private_jwk, public_jwk, created_at, activates_at, retired_at, generation from signing_keys";

interface RawKeyRow {
  kid: string;
  alg: string;
  private_jwk: string;
  public_jwk: string;
  created_at: Date | number | string;
  activates_at: Date | number | string | null;
  retired_at: Date | number | string | null;
  generation: number | string | null;
}

/** A raw row as the entity has it: SQLite gives times as epoch ms, PostgreSQL as Dates. */
function keyRowOf(r: RawKeyRow): SigningKey {
  const date = (v: Date | number | string) =>
    v instanceof Date ? v : new Date(typeof v === "string" && /^\d+$/.test(v) ? Number(v) : v);
  return {
    kid: r.kid,
    alg: r.alg,
    privateJwk: r.private_jwk,
    publicJwk: r.public_jwk,
    createdAt: date(r.created_at),
    activatesAt: r.activates_at === null ? null : date(r.activates_at),
    retiredAt: r.retired_at === null ? null : date(r.retired_at),
    generation: r.generation === null ? null : Number(r.generation),
  };
}

/**
 * Every signing key row, in one query. Raw SQL, not the ORM: every instance runs this every
 * `keyRefreshMs`, and an ORM find costs many times the CPU of the query itself
 * (bench/results/2026-12-04-key-refresh.md).
 */
export async function readSigningKeys(storage: Storage): Promise<SigningKey[]> {
  return (await storage.em.getConnection().execute<RawKeyRow[]>(KEY_ROWS_SQL)).map(keyRowOf);
}
