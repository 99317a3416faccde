import type { EntityManager } from "@mikro-orm/knex";
import { type Principal, TENANT_DISABLED_MESSAGE } from "../../auth/principal.js";
import type { RequestState } from "../../context.js";
import { TesseraError } from "../../errors.js";
import { Session, Tenant, User } from "../../storage/entities.js";
import { ApiToken } from "../../storage/token-entities.js";

/**
 * Revoke, at `at`, the tokens made with the token `id` (just revoked), the tokens made with
 * those, and so on: else a stolen token is laundered into one that the revocation of the stolen
 * one leaves standing. A token made meanwhile with one revoked here is refused by
 * {@link assertMakerStands}: either its check reads after this token's revocation committed,
 * or its row committed before the look-up below.
 */
export async function revokeMadeWith(em: EntityManager, id: string, at: Date): Promise<void> {
  let parents = [id];
  while (parents.length > 0) {
    const made = await em.find(
      ApiToken,
      { madeWithTokenId: { $in: parents }, revokedAt: null },
      { fields: ["id"], disableIdentityMap: true },
    );
    parents = made.map((t) => t.id);
    if (parents.length > 0)
      await em.nativeUpdate(ApiToken, { id: { $in: parents }, revokedAt: null }, { revokedAt: at });
  }
}

/**
 * Whether the credential a new token was made with still stands, read after the new token's
 * row committed (through `em`, a fresh fork: nothing cached). A token is made after a PBKDF2
 * (slow by design) that follows its caller's authentication: an end committed meanwhile (a
 * password change or reset with `revoke_tokens`, a logout, a revocation of the creating
 * token, a disable) would otherwise leave a token standing that it would have ended, and a
 * thief keeping a creation in flight would outlive every end its victim can make. Each end
 * ends the maker first and the user's tokens after it (password change and reset: the hash,
 * the sessions, then the tokens): either it committed before this read (seen here) or its
 * token revocation comes after the new row (and covers it).
 * @throws TesseraError TOKEN_REVOKED (the maker ended) or PRINCIPAL_DISABLED
 */
export async function assertMakerStands(
  em: EntityManager,
  principal: Principal,
  state: RequestState,
): Promise<void> {
  const ended = () =>
    new TesseraError("TOKEN_REVOKED", "the credential this request was made with has ended");
  if (
    principal.sessionId !== undefined &&
    !(await em.count(Session, { id: principal.sessionId, revokedAt: null }))
  )
    throw ended();
  if (
    (principal.method === "pat" || principal.method === "api_key") &&
    principal.credentialId !== undefined &&
    !(await em.count(ApiToken, { id: principal.credentialId, revokedAt: null }))
  )
    throw ended();
  // HTTP Basic: the password it was made with (a change ends nothing else of Basic's).
  const read = state.user as { passwordHash?: unknown } | undefined;
  const hash =
    principal.method === "basic" && typeof read?.passwordHash === "string" ? read.passwordHash : undefined;
  const user = await em.findOne(
    User,
    { id: principal.id },
    { fields: ["disabled", "passwordHash", "tenantId"] },
  );
  if (!user) throw ended();
  // A hash changed since: a password changed, unless it is a re-hash of this very one.
  if (hash !== undefined && user.passwordHash !== hash && !(await state.samePassword?.(user.passwordHash)))
    throw ended();
  if (user.disabled) throw new TesseraError("PRINCIPAL_DISABLED", "user is disabled");
  if (!(await em.count(Tenant, { id: user.tenantId, disabled: false })))
    throw new TesseraError("PRINCIPAL_DISABLED", TENANT_DISABLED_MESSAGE);
}
