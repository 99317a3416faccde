/**
 * What the two rival servers (bench/rival-fastify.ts, bench/rival-grpc-js.ts) share: the
 * JWT settings of the Tessera server they stand in for, and the answer they build from a
 * verified token's claims.
 *
 * A rival reads no state: it answers from the token alone, where Tessera reads its state
 * cache on every call (the user still exists, its scopes, revocation). The user's creation
 * time, which only Tessera's database knows, is handed over at start-up so that every
 * server serialises the same answer.
 */

/** Tessera's default `auth.jwt.issuer` and `auth.jwt.audience`, which the bench's servers keep. */
export const TESSERA_ISSUER = "tessera";
export const TESSERA_AUDIENCE = "tessera";

/** The environment a rival is started with (bench/run.ts); the secret is not put on the command line. */
export interface RivalSettings {
  /** Tessera's TESSERA_JWT_SECRET (HS256, its UTF-8 bytes are the key). */
  secret: string;
  /** The bench user's `createdAt` exactly as Tessera's Connect JSON answer spells it (RFC 3339). */
  createdAt: string;
}

export function rivalSettings(env: NodeJS.ProcessEnv = process.env): RivalSettings {
  const secret = env.RIVAL_JWT_SECRET;
  const createdAt = env.RIVAL_CREATED_AT ?? "";
  if (!secret) throw new Error("RIVAL_JWT_SECRET is not set");
  if (Number.isNaN(Date.parse(createdAt))) throw new Error("RIVAL_CREATED_AT is not an RFC 3339 time");
  return { secret, createdAt };
}

/** The claims of a Tessera user access token that the answer is built from. */
export interface TesseraClaims {
  sub?: unknown;
  tid?: unknown;
  scope?: unknown;
  preferred_username?: unknown;
}

/** GetCurrentUserResponse's fields (without created_at) from a verified token; null when a claim is missing. */
export function userFromClaims(
  claims: TesseraClaims,
): { id: string; username: string; tenantId: string; permissions: string[] } | null {
  const { sub, tid, scope, preferred_username: username } = claims;
  if (typeof sub !== "string" || typeof tid !== "string" || typeof scope !== "string") return null;
  if (typeof username !== "string") return null;
  return { id: sub, username, tenantId: tid, permissions: scope ? scope.split(" ") : [] };
}
