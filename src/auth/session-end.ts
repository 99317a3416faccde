/**
 * Why a refresh, or a user access token, past its session's absolute end is refused
 * (TOKEN_EXPIRED: an expired credential, nothing revoked).
 */
export const SESSION_LIFETIME_OVER = "the session has ended: it reached its maximum lifetime; log in again";

/**
 * When a user session that began at `startedAt` (epoch ms, its `sessions.created_at`) ends
 * under `auth.sessionMaxLifetime` = `maxLifetimeSeconds`, as epoch ms; infinite with no bound
 * (0). One rule for the instance that issues a session's tokens (SessionIssuer) and the one that
 * accepts them (the user claims loader), so that both put the end at the same instant.
 */
export function sessionEnd(startedAt: number, maxLifetimeSeconds: number): number {
  // Down to a whole second, as a JWT's `exp` is: a pair issued in the end's last fraction
  // of a second carried an access token dead on arrival.
  return maxLifetimeSeconds > 0
    ? Math.floor((startedAt + maxLifetimeSeconds * 1000) / 1000) * 1000
    : Number.POSITIVE_INFINITY;
}
