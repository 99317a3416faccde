import type { EntityManager } from "@mikro-orm/knex";
import { RefreshToken, Session } from "../entities.js";

/**
 * Delete at most `batchSize` sessions that ended before `cutoff`, with their refresh tokens;
 * returns how many sessions went. Ended: revoked before the cut-off, or never revoked,
 * opened before it, and with no refresh token expiring at or after it (so none can be
 * refreshed again). One transaction per batch, so no pruning holds a long lock.
 */
export async function deleteEndedSessions(
  em: EntityManager,
  cutoff: Date,
  batchSize: number,
): Promise<number> {
  const fork = em.fork();
  // Families with a refresh token still alive at the cut-off: not ended (or not long enough).
  const live = fork
    .createQueryBuilder(RefreshToken, "r")
    .select("r.familyId")
    .where({ expiresAt: { $gte: cutoff } })
    .getKnexQuery();
  const ended = await fork
    .createQueryBuilder(Session, "s")
    .select("s.id")
    .where({
      $or: [
        { revokedAt: { $ne: null, $lt: cutoff } },
        { revokedAt: null, createdAt: { $lt: cutoff }, id: { $nin: live } },
      ],
    })
    .limit(batchSize)
    .execute<{ id: string }[]>("all", false);
  const ids = ended.map((r) => r.id);
  if (ids.length === 0) return 0;
  await fork.transactional(async (tx) => {
    await tx.nativeDelete(RefreshToken, { familyId: { $in: ids } });
    await tx.nativeDelete(Session, { id: { $in: ids } });
  });
  return ids.length;
}
