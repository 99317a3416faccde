// The PostgreSQL state channel: on which channel a schema's changes are announced, which tables
// announce them (triggers checked to be in place), and who listens for signing-key changes.
import { createHash } from "node:crypto";
import type { Storage } from "./orm.js";
import { PgNotifier, type PgNotifyLogger } from "./pg-notify.js";
import { STATE_TABLES } from "./row-cache.js";

/**
 * The channel on which the triggers of Migration20261204230000_state_notify announce a
 * change to a state table of `schema` (payload: the table name). One per schema, since
 * LISTEN/NOTIFY is per database and schemas share one; md5 keeps it a short identifier.
 */
export function stateChannel(schema: string): string {
  return `tessera_state_${createHash("md5").update(schema).digest("hex")}`;
}

/**
 * This instance's listening session for a PostgreSQL storage, not started: its
 * `application_name` names the schema's state channel, so the write barriers of the other
 * instances find it in `pg_stat_activity`. Subscribe (createSqlRunner does, and any other
 * user of the session should) before calling its `start()`.
 * @param barrierTimeoutMs `database.barrierTimeoutMs`: the state cache trusts the session
 *   only that long after the last query it answered was sent (PgStateCache), so the
 *   keepalive asks four times as often (at least once a second)
 */
export async function createStateNotifier(
  storage: Storage,
  logger?: PgNotifyLogger,
  barrierTimeoutMs = 1_000,
): Promise<PgNotifier> {
  return new PgNotifier({
    url: storage.target.location,
    applicationName: `tessera:${await stateChannelOf(storage)}`,
    keepaliveMs: Math.max(10, Math.min(1_000, Math.floor(barrierTimeoutMs / 4))),
    ...(logger ? { logger } : {}),
  });
}

/** The state channel of the schema `storage` works in ({@link stateChannel}). */
export async function stateChannelOf(storage: Storage): Promise<string> {
  const rows = (await storage.em.getConnection().execute("select current_schema() as s")) as { s: string }[];
  return stateChannel(rows[0]?.s ?? "public");
}

/** The payload the triggers send for a change to the signing keys. */
export const SIGNING_KEYS_PAYLOAD = "signing_keys";

/**
 * Have `onChange` called when the signing keys change (the `signing_keys` trigger's
 * notification on `channel`), and when the listener comes back online (a change may have
 * been missed meanwhile). Subscribe before the notifier starts.
 */
export function subscribeKeyChanges(notifier: PgNotifier, channel: string, onChange: () => void): void {
  notifier.subscribe(channel, (payload) => {
    if (payload === SIGNING_KEYS_PAYLOAD) onChange();
  });
  notifier.onStatus((online) => {
    if (online) onChange();
  });
}

/** Tables the triggers announce: the state tables and the signing keys. */
export const ANNOUNCED: ReadonlySet<string> = new Set<string>([...STATE_TABLES, "signing_keys"]);

/** The trigger Migration20261204230000_state_notify puts on every announced table. */
export const NOTIFY_TRIGGER = "tessera_state_notify";

/**
 * SQL listing, of the tables named in its one parameter (comma-separated: knex would expand
 * an array parameter into a list) in the current schema, those whose changes are surely
 * announced: the row trigger (after insert, update and delete; sessions: update and
 * delete) and the statement trigger after truncate, both calling the notify function and
 * enabled ALWAYS (an ordinary trigger does not fire for a writer in `replica` session
 * replication role; a disabled one not at all). A table rebuilt, a trigger dropped, disabled
 * or repointed by hand would leave changes unannounced and caches stale.
 * tgtype bits: 1 row, 2 before, 4 insert, 8 delete, 16 update, 32 truncate.
 */
export const TRIGGERED_TABLES_SQL =
  "select c.relname as t from pg_class c join pg_namespace n on n.oid = c.relnamespace " +
  "where n.nspname = current_schema() and c.relname = any(string_to_array(?, ',')) " +
  "and exists (select 1 from pg_trigger tg where tg.tgrelid = c.oid " +
  `and tg.tgname = '${NOTIFY_TRIGGER}' and tg.tgenabled = 'A' and tg.tgfoid = to_regproc('${NOTIFY_TRIGGER}')::oid ` +
  "and (tg.tgtype & 31) = (case when c.relname = 'sessions' then 25 else 29 end)) " +
  "and exists (select 1 from pg_trigger tg where tg.tgrelid = c.oid " +
  `and tg.tgname = '${NOTIFY_TRIGGER}_truncate' and tg.tgenabled = 'A' and tg.tgfoid = to_regproc('${NOTIFY_TRIGGER}')::oid ` +
  "and (tg.tgtype & 35) = 32)";

/** How often a running instance checks that the notify triggers are still in place. */
export const TRIGGER_CHECK_MS = 5_000;

/** Every table whose changes must be announced, for {@link TRIGGERED_TABLES_SQL}. */
export const ANNOUNCED_TABLES: readonly string[] = [...ANNOUNCED];
