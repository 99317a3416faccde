// The one order in which the RPCs that change applications, machine users, their
// assignments and their backends take row locks on PostgreSQL.
import { LockMode } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/knex";
import { User } from "./entities.js";
import { Application, MachineUser } from "./machine-entities.js";

/*
 * Lock order (PostgreSQL; SQLite runs one write transaction at a time and drops these
 * clauses). Two transactions taking rows in opposite orders deadlock: PostgreSQL ends one
 * after deadlock_timeout (40P01), answered Unavailable. Each transaction locks, in order:
 *
 *   1. applications, in id order: DeleteApplication FOR UPDATE (its row); UpdateMachineUser
 *      FOR SHARE on those it assigns ({@link lockApplications}); the FOR KEY SHARE of the
 *      foreign-key check of a new assignment (CreateMachineUser) or backend (RegisterBackend);
 *   2. machine users, in id order: locked ({@link lockMachineUser}) before their rows are
 *      touched by UpdateMachineUser (assignments), RotateMachineUserCredentials
 *      (credentials; FOR UPDATE), UnbindCertificate and BindCertificate's displacement (bindings);
 *      DeleteMachineUser's DELETE;
 *      DeleteApplication FOR SHARE on those it changes (assigned, or owning a backend on it);
 *   3. their rows: assignments, backends (DeleteApplication FOR UPDATE, DeregisterBackend's
 *      DELETE, a RegisterBackend take-over's UPDATE), credentials, certificate bindings, and
 *      the ON DELETE CASCADE of a DELETE of 1 or 2.
 *
 * The steps back: a take-over's UPDATE (3) checks its new owner's key (FOR KEY SHARE on 2),
 * which waits only for a FOR UPDATE or DELETE of that machine user, whose holders wait for
 * none of another owner's backends. BindCertificate displacing another machine user's
 * unproven binding locks that machine user (2) before it deletes the binding (3) and writes
 * the machine user's cut-off. UpdateTenant (disable) locks only the tenant's row (FOR NO KEY UPDATE: the KEY
 * SHARE checks of its children do not wait for it). DeleteApplication finds the machine
 * users of 2 by reading 3 unlocked (with its row FOR UPDATE, nothing can be assigned to or
 * registered on it), and refuses (FailedPrecondition) if a backend changed owner before it
 * locked them.
 *
 * Users: a user's row before its refresh tokens. DeleteUser's DELETE takes the row, then
 * (ON DELETE CASCADE) its refresh tokens and sessions; RefreshToken takes the user's row FOR
 * KEY SHARE ({@link lockUser}) before it spends its token and inserts the next one (whose
 * foreign-key check takes the same share).
 */

/**
 * Lock the applications `ids` of `tenantId` FOR SHARE, in id order (step 1): none can be
 * deleted until the commit. Those that exist (a deleted one is not waited for, it is
 * missing); lock before any row of a later step.
 */
export async function lockApplications(
  tx: EntityManager,
  tenantId: string,
  ids: readonly string[],
): Promise<string[]> {
  if (ids.length === 0) return [];
  const rows: { id: string }[] = await tx
    .createQueryBuilder(Application)
    .select("id")
    .where({ id: { $in: [...ids] }, tenantId })
    .orderBy({ id: "asc" })
    .setLockMode(LockMode.PESSIMISTIC_READ)
    .execute("all", false);
  return rows.map((r) => r.id);
}

/**
 * Lock the machine user `id` (step 2) before any of its rows (step 3): whether it still
 * exists. Any mode makes a DeleteMachineUser (whose cascade takes those rows) wait for this
 * transaction. "key share" lets a promotion (an UPDATE of its scopes) commit meanwhile, for
 * the transaction's own assertScopesHold to see; "no key update" (UpdateMachineUser, whose
 * UPDATE takes it anyway) also orders it with DeleteApplication's FOR SHARE; "update"
 * (RotateMachineUserCredentials) waits for every other lock on the row, "key share" too, so
 * that rotations take turns, each seeing the credential the one before it made, including
 * those of an instance on the previous release (which took "key share").
 */
export async function lockMachineUser(
  tx: EntityManager,
  id: string,
  mode: "key share" | "no key update" | "update",
): Promise<boolean> {
  const query = tx.createQueryBuilder(MachineUser).select("id").where({ id }).getKnexQuery();
  // MikroORM's lock modes lack the first two (knex drops all three on SQLite).
  if (mode === "key share") query.forKeyShare();
  else if (mode === "no key update") query.forNoKeyUpdate();
  else query.forUpdate();
  const rows = await tx.getConnection().execute(query, [], "all", tx.getTransactionContext());
  return rows.length === 1;
}

/**
 * Lock the user `id` FOR KEY SHARE before any of its refresh tokens: whether it still
 * exists. A DeleteUser waits for this transaction, or this one for it (and then finds the
 * user gone); a password change or a disable (no key update) does not wait.
 */
export async function lockUser(tx: EntityManager, id: string): Promise<boolean> {
  const query = tx.createQueryBuilder(User).select("id").where({ id }).getKnexQuery();
  query.forKeyShare();
  const rows = await tx.getConnection().execute(query, [], "all", tx.getTransactionContext());
  return rows.length === 1;
}
