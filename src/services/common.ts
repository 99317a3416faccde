import { type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext } from "@connectrpc/connect";
import type { EntityName } from "@mikro-orm/core";
import type { EntityManager, FilterQuery } from "@mikro-orm/knex";
import { auditTarget } from "../admission/audit.js";
import { assertMayManage, NEW_PRINCIPAL } from "../auth/authority.js";
import { MACHINE_USERNAME_PREFIX } from "../auth/machine-principal.js";
import type { Principal } from "../auth/principal.js";
import { isSuperuser } from "../auth/principal.js";
import { requestState } from "../context.js";
import { errors, TesseraError } from "../errors.js";
import { MAX_TIMESTAMP_MS } from "./pagination.js";

/** The authenticated principal of a handler's request (the interceptors guarantee one on non-public methods). */
export function principalOf(ctx: HandlerContext): Principal {
  const p = requestState(ctx.values).principal;
  if (!p) throw new TesseraError("AUTH_REQUIRED", "Authentication required");
  return p;
}

/**
 * The tenant a principal's queries are confined to, or null for a superuser (`*`), who
 * sees every tenant. Every list and look-up by id goes through this.
 */
export function tenantScope(principal: Principal): string | null {
  return isSuperuser(principal) ? null : principal.tenantId;
}

/** The filter confining a list to the principal's tenant (`column` holds the tenant's id); none for a superuser. */
export function tenantWhere<K extends string>(principal: Principal, column: K): Partial<Record<K, string>> {
  const scope = tenantScope(principal);
  return scope === null ? {} : ({ [column]: scope } as Record<K, string>);
}

/** Whether a row of `tenantId` is visible to the principal (not visible reads as NotFound). */
export function canSeeTenant(principal: Principal, tenantId: string): boolean {
  const scope = tenantScope(principal);
  return scope === null || scope === tenantId;
}

/**
 * Whether the caller of `ctx` may act on a row of `tenantId` ({@link canSeeTenant}; not
 * visible reads as NotFound). When it may, the call now acts in that tenant: named as its
 * audit record's tenant (auditTarget), so that a `*` caller's act on the row is filed where
 * the row's tenant's auditors read it. Every handler loading an object by id checks it
 * through here, so none can act on an object without naming its tenant.
 */
export function reachesTenant(ctx: HandlerContext, tenantId: string): boolean {
  if (!canSeeTenant(principalOf(ctx), tenantId)) return false;
  auditTarget(requestState(ctx.values), { tenantId });
  return true;
}

/**
 * The row `id` of `entity` when the caller of `ctx` may act on it ({@link reachesTenant}),
 * else null. The look-up itself is confined to the caller's tenant (a `*` caller's to none):
 * another tenant's row is never read, so it costs exactly what a missing one costs (read and
 * then refused, its hydration was a timing difference telling its id from a missing one).
 */
export async function findReachable<T extends { id: string; tenantId: string }>(
  ctx: HandlerContext,
  em: EntityManager,
  entity: EntityName<T>,
  id: string,
  where: Record<string, unknown> = {},
): Promise<T | null> {
  const scope = tenantScope(principalOf(ctx));
  const query = { ...where, id, ...(scope === null ? {} : { tenantId: scope }) } as FilterQuery<T>;
  const row = await em.findOne(entity, query);
  return row !== null && reachesTenant(ctx, row.tenantId) ? row : null;
}

/**
 * Validate requested scopes and that the caller holds them (no privilege escalation):
 * {@link assertMayManage} for a principal that holds nothing yet (a new one, or a token
 * the caller mints for itself).
 */
export function assertGrantableScopes(principal: Principal, scopes: readonly string[]): void {
  assertMayManage(principal, NEW_PRINCIPAL, scopes);
}

/**
 * Mark the answer of `ctx` as one no cache may keep: it carries a secret (a token, a
 * password), like the OAuth token endpoint's (RFC 6749 §5.1). Only on those answers: on
 * every RPC it would be bytes on the hot path for nothing.
 */
export function noStore(ctx: HandlerContext): void {
  ctx.responseHeader.set("cache-control", "no-store");
}

/** A principal changed between the authority check and the write: nothing was written. */
export function principalChanged(): TesseraError {
  return new TesseraError(
    "FAILED_PRECONDITION",
    "the principal changed while this request was handled; read it again and retry",
  );
}

/**
 * Run `write` in a transaction that commits only if the principal's row then holds exactly
 * `scopes` (what {@link assertMayManage} checked, or what this change sets). The check read
 * the row before the write, and a password reset or credential rotation spends a PBKDF2
 * (slow by design) in between: a promotion of the same principal meanwhile would otherwise let the
 * write land on a principal stronger than the one checked. The re-read happens after the
 * write in the same transaction (PostgreSQL holds the written row's lock until commit;
 * SQLite runs one transaction at a time), so a concurrent promotion either shows up here
 * or is ordered after this change. Else FAILED_PRECONDITION and nothing is written.
 */
export async function writeIfScopesHold(
  em: EntityManager,
  entity: EntityName<{ id: string; scopes: string }>,
  id: string,
  scopes: string,
  write: (tx: EntityManager) => Promise<unknown>,
  checked: string = scopes,
): Promise<void> {
  await em.transactional(async (tx) => {
    await setScopesIfHeld(tx, entity, id, checked, scopes);
    await write(tx);
    await assertScopesHold(tx, entity, id, scopes);
  });
}

/**
 * A change that sets the scopes (`checked` → `scopes`) writes them only over the row as the
 * authority check read it, in one conditional statement (which then holds the row's lock on
 * PostgreSQL): checked after the write, the row always holds what the write set, so a
 * promotion committed meanwhile would be overwritten unseen, and the rest of the change (a
 * password reset, a disable) land on the stronger principal. Else FAILED_PRECONDITION.
 * Nothing to do when the scopes do not change ({@link assertScopesHold} after the write sees it).
 */
export async function setScopesIfHeld(
  tx: EntityManager,
  entity: EntityName<{ id: string; scopes: string }>,
  id: string,
  checked: string,
  scopes: string,
): Promise<void> {
  if (checked === scopes) return;
  if ((await tx.nativeUpdate(entity, { id, scopes: checked }, { scopes })) !== 1) throw principalChanged();
}

/** The check of {@link writeIfScopesHold}, for a transaction that is already open (after its writes). */
export async function assertScopesHold(
  tx: EntityManager,
  entity: EntityName<{ id: string; scopes: string }>,
  id: string,
  scopes: string,
): Promise<void> {
  if ((await tx.count(entity, { id, scopes })) !== 1) throw principalChanged();
}

const USERNAME_RE = /^[A-Za-z0-9][A-Za-z0-9._@-]{2,63}$/;

/** Usernames: 3-64 characters, letters, digits and . _ @ - */
export function assertUsername(username: string, field = "username"): void {
  if (!USERNAME_RE.test(username)) {
    throw errors.invalidArgument(`${field} must be 3-64 characters of letters, digits and . _ @ -`, field);
  }
  // Reserved for generated machine-user Basic usernames.
  if (username.startsWith(MACHINE_USERNAME_PREFIX)) {
    throw errors.invalidArgument(
      `${field} must not start with "${MACHINE_USERNAME_PREFIX}" (reserved for machine users)`,
      field,
    );
  }
}

/** Password policy (NIST 800-63B): at least 12 characters, at most 1024; no composition rules. */
export function assertPassword(password: string, field = "password"): void {
  if (password.length < 12) throw errors.invalidArgument(`${field} must be at least 12 characters`, field);
  if (password.length > 1024) throw errors.invalidArgument(`${field} must be at most 1024 characters`, field);
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Ids are UUIDs; anything else cannot exist, so it is NotFound (same as a missing row), after a format check. */
export function assertId(id: string, what: string, field = "id"): void {
  if (!id) throw errors.invalidArgument(`${field} is required`, field);
  if (!UUID_RE.test(id)) throw errors.notFound(what);
}

/** The first instant a google.protobuf.Timestamp holds (0001-01-01T00:00:00Z), in ms. */
const MIN_TIMESTAMP_MS = -62_135_596_800_000;

/**
 * A request's Timestamp field as a Date, or InvalidArgument when it is outside the range the
 * Timestamp type defines (rounded to the millisecond as it is used). Connect JSON refuses
 * such values while parsing; binary gRPC carries any pair of integers, which would become an
 * Invalid Date, or a year PostgreSQL cannot read back, deep in a query.
 */
export function requestTime(value: Timestamp, field: string): Date {
  const date = timestampDate(value);
  const ms = date.getTime();
  if (!(ms >= MIN_TIMESTAMP_MS && ms <= MAX_TIMESTAMP_MS) || value.nanos < 0 || value.nanos > 999_999_999)
    throw errors.invalidArgument(`${field} must be within years 1 to 9999`, field);
  return date;
}
