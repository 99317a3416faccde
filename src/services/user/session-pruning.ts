import type { EntityManager } from "@mikro-orm/knex";
import type { Logger } from "pino";
import {
  deleteSessions,
  type OpenSessionCursor,
  openSessionsEndedBefore,
  sessionsRevokedBefore,
} from "../../storage/repositories/sessions.js";

/** Sessions deleted per statement: bounded, so one pruning never holds a long lock. */
export const PRUNE_BATCH_SIZE = 500;

/** Batches per pruning at most, of each kind (the rest waits for the next one): bounded work per tick. */
const MAX_BATCHES = 20;

/**
 * Where the walk over never-revoked sessions stopped: a pruning goes on from there, so a
 * table with more long-lived sessions than one pruning reads is still walked to its end
 * (then it starts over).
 */
export interface PruneWalk {
  cursor: OpenSessionCursor | null;
}

/** What decides which sessions may go. */
export interface SessionPruneOptions {
  /** auth.jwt.refreshTokenTtl */
  refreshTokenTtlSeconds: number;
  /** auth.maxTokenTtl: no access token outlives its issue by more. */
  maxTokenTtlSeconds: number;
  /** auth.jwt.clockSkew: verifiers accept a token this long past its `exp`. */
  clockSkewSeconds: number;
  batchSize?: number;
  /** Clock (tests). */
  now?: () => number;
}

/**
 * How long an ended session is kept: the refresh-token lifetime, and never less than the
 * longest an access token can still verify after it was issued (maxTokenTtl + clockSkew).
 * A session's access tokens are all issued before it ends (revoked, or its last refresh
 * token expired: no refresh can mint one after), so past this margin none can verify, and
 * deleting the row (which the authentication path reads as "no such session", refused)
 * changes nothing for any token.
 */
export function sessionRetentionMs(o: SessionPruneOptions): number {
  return Math.max(o.refreshTokenTtlSeconds, o.maxTokenTtlSeconds + o.clockSkewSeconds) * 1000;
}

/**
 * Delete the sessions that ended more than {@link sessionRetentionMs} ago, with their
 * refresh tokens, in batches: those revoked before the cut-off, and those never revoked
 * that were opened before it and have no refresh token expiring after it (expired, so
 * never refreshed again). Their refresh tokens go too: expired or revoked, they can only
 * be refused, and left alone one could re-open its session's row (SessionIssuer.issue
 * gives a family without a row a new one). The never-revoked ones are walked in order of
 * opening from `walk` on, a bounded step per batch. Returns how many sessions were deleted.
 */
export async function pruneSessions(
  em: EntityManager,
  o: SessionPruneOptions,
  walk: PruneWalk = { cursor: null },
): Promise<number> {
  const batchSize = o.batchSize ?? PRUNE_BATCH_SIZE;
  const cutoff = new Date((o.now ?? Date.now)() - sessionRetentionMs(o));
  let deleted = 0;
  let turns = 0;
  // A turn of the event loop between batches: on SQLite every query is answered in the
  // calling turn, and 20 batches of 500 held the loop 1.6–1.8 s (requests waited meanwhile).
  const turn = () => (turns++ === 0 ? undefined : new Promise((resolve) => setImmediate(resolve)));
  for (let batch = 0; batch < MAX_BATCHES; batch++) {
    await turn();
    const ids = await sessionsRevokedBefore(em, cutoff, batchSize);
    await deleteSessions(em, ids);
    deleted += ids.length;
    if (ids.length < batchSize) break;
  }
  for (let batch = 0; batch < MAX_BATCHES; batch++) {
    await turn();
    const step = await openSessionsEndedBefore(em, cutoff, walk.cursor, batchSize);
    await deleteSessions(em, step.ended);
    deleted += step.ended.length;
    walk.cursor = step.next;
    if (step.next === null) break;
  }
  return deleted;
}

/**
 * Prune on a timer (every `intervalSeconds`, unref'd; 0: never). A failed pruning (the
 * database gone) is logged and tried again at the next tick: nothing depends on it.
 * Every instance prunes; concurrent prunings delete the same rows at most twice, harmlessly.
 */
export function startSessionPruner(
  em: EntityManager,
  o: SessionPruneOptions & { intervalSeconds: number; logger: Pick<Logger, "info" | "warn"> },
): { close(): Promise<void> } {
  if (o.intervalSeconds <= 0) return { close: async () => undefined };
  let running: Promise<void> | undefined;
  const walk: PruneWalk = { cursor: null };
  const tick = () => {
    if (running) return;
    running = pruneSessions(em, o, walk)
      .then(
        (n) => {
          if (n > 0) o.logger.info({ sessions: n }, "pruned ended sessions");
        },
        (err: unknown) =>
          o.logger.warn({ err: err instanceof Error ? err.name : "unknown" }, "session pruning failed"),
      )
      .finally(() => {
        running = undefined;
      });
  };
  const timer = setInterval(tick, o.intervalSeconds * 1000);
  timer.unref();
  return {
    async close() {
      clearInterval(timer);
      await running;
    },
  };
}
