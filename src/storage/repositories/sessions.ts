import type { EntityManager } from "@mikro-orm/knex";
import { RefreshToken, Session } from "../entities.js";

/** Where a walk over never-revoked sessions, in (created_at, id) order, goes on from. */
export interface OpenSessionCursor {
  createdAt: Date;
  id: string;
}

/**
 * At most `limit` ids of sessions revoked before `cutoff` (a range of
 * `sessions_revoked_at_index`: the work follows the rows found, not the table's size).
 */
export async function sessionsRevokedBefore(
  em: EntityManager,
  cutoff: Date,
  limit: number,
): Promise<string[]> {
  const rows = await em
    .fork()
    .find(
      Session,
      { revokedAt: { $lt: cutoff } },
      { fields: ["id"], orderBy: { revokedAt: "asc" }, limit, disableIdentityMap: true },
    );
  return rows.map((r) => r.id);
}

/**
 * One step of a walk over the sessions never revoked and opened before `cutoff`: the next
 * `limit` of them after `after` (a range of the partial index
 * `sessions_open_created_at_id_index`), and of those the ids with no refresh token expiring
 * at or after `cutoff` (so none can be refreshed again: ended). `next` is where the walk goes
 * on, or null once it has reached the end. Each step reads at most `limit` sessions, however
 * many long-lived sessions (opened before the cut-off, refreshed since) lie before the ended
 * ones: selecting the ended ones directly made the database scan every such session, and
 * every refresh token, for every batch.
 */
export async function openSessionsEndedBefore(
  em: EntityManager,
  cutoff: Date,
  after: OpenSessionCursor | null,
  limit: number,
): Promise<{ ended: string[]; next: OpenSessionCursor | null }> {
  const fork = em.fork();
  // created_at >= c AND (created_at > c OR id > c.id), not the OR alone: the range keeps the
  // index's lower bound, so a step does not re-read the sessions of the steps before it.
  const from = after
    ? {
        createdAt: { $gte: after.createdAt, $lt: cutoff },
        $or: [{ createdAt: { $gt: after.createdAt } }, { id: { $gt: after.id } }],
      }
    : { createdAt: { $lt: cutoff } };
  const candidates = await fork.find(
    Session,
    { revokedAt: null, ...from },
    {
      fields: ["id", "createdAt"],
      orderBy: { createdAt: "asc", id: "asc" },
      limit,
      disableIdentityMap: true,
    },
  );
  if (candidates.length === 0) return { ended: [], next: null };
  const live = await fork
    .createQueryBuilder(RefreshToken, "r")
    .select("r.familyId", true)
    .where({ familyId: { $in: candidates.map((c) => c.id) }, expiresAt: { $gte: cutoff } })
    .execute<{ familyId: string }[]>("all");
  const alive = new Set(live.map((r) => r.familyId));
  const last = candidates[candidates.length - 1]!;
  return {
    ended: candidates.filter((c) => !alive.has(c.id)).map((c) => c.id),
    next: candidates.length < limit ? null : { createdAt: last.createdAt, id: last.id },
  };
}

/** Delete sessions with their refresh tokens, in one transaction. */
export async function deleteSessions(em: EntityManager, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return;
  await em.fork().transactional(async (tx) => {
    await tx.nativeDelete(RefreshToken, { familyId: { $in: [...ids] } });
    await tx.nativeDelete(Session, { id: { $in: [...ids] } });
  });
}
