// Which SQL statements change announced state, and the connection hook that makes each such
// write wait, once committed, until every instance has emptied its state cache.
import { ANNOUNCED } from "./pg-state-channel.js";
import { INSERT_EXEMPT } from "./row-cache.js";

/** Statements that write nothing the triggers announce. */
const NO_WRITE =
  /^\s*(?:select|show|set|begin|start\s+transaction|commit|rollback|savepoint|release|listen|unlisten|notify|explain|create\s+schema)\b/i;
const WRITE_TARGET = /^\s*(insert\s+into|update|delete\s+from)\s+(?:"?\w+"?\.)?"?(\w+)"?/i;
/** The coalesced last-used flush (auth/last-used.ts): the triggers ignore it, so the barrier does too. */
const LAST_USED_ONLY =
  /^\s*update\s+(?:"?\w+"?\.)?"?\w+"?\s+set\s+"?last_used_at"?\s*=\s*('[^']*'|\?|\$\d+|[\w:.+-]+)\s+where\b/i;
/**
 * A shared verified-secret digest stored (auth/secret-cache.ts): the triggers ignore it
 * (Migration20261205010000_verified_digests says why that is safe), so the barrier does too.
 */
const VERIFIED_DIGEST_ONLY =
  /^\s*update\s+(?:"?\w+"?\.)?"?\w+"?\s+set\s+"?verified_digest"?\s*=\s*(\?|\$\d+)\s+where\b/i;

/**
 * Whether a statement may change what the state triggers announce. Anything not
 * recognised as harmless counts as a change (a needless barrier costs a round trip; a
 * missing one would let this instance return before its cache is emptied).
 */
export function writesAnnouncedState(sql: string): boolean {
  if (NO_WRITE.test(sql)) return false;
  const m = WRITE_TARGET.exec(sql);
  if (!m) return true;
  const table = m[2]!.toLowerCase();
  if (!ANNOUNCED.has(table)) return false;
  if (/^insert/i.test(m[1]!) && INSERT_EXEMPT.has(table)) return false;
  return !LAST_USED_ONLY.test(sql) && !VERIFIED_DIGEST_ONLY.test(sql);
}

/** The few members of MikroORM's SQL connection the write hook wraps. */
interface HookableConnection {
  execute(
    query: unknown,
    params?: unknown,
    method?: unknown,
    ctx?: unknown,
    ...rest: unknown[]
  ): Promise<unknown>;
  begin(options?: { ctx?: unknown }): Promise<unknown>;
  commit(ctx: unknown, ...rest: unknown[]): Promise<void>;
}

function sqlText(query: unknown): string {
  if (typeof query === "string") return query;
  const compiled = (query as { toSQL?: () => { sql?: string } }).toSQL?.();
  return compiled?.sql ?? "";
}

/**
 * Make every write to announced state through `conn` (MikroORM's connection, which the
 * ORM's flushes, native queries, query builders and `SqlRunner.run` all execute through)
 * wait for `afterCommit` once it has committed: right after the statement outside a
 * transaction, after the commit of the outermost transaction inside one (a savepoint's
 * writes count for the transaction around it). Instance-level wrappers, not a subclass:
 * the driver creates its connection itself.
 */
export function installWriteHook(conn: HookableConnection, afterCommit: () => Promise<void>): void {
  const parents = new WeakMap<object, object>();
  const dirty = new WeakSet<object>();
  /** A write whose transaction could not be told (a knex builder bound to one): barrier at the next commit. */
  let untracked = false;
  // A knex transaction is a function object.
  const isTrx = (ctx: unknown): ctx is object =>
    ctx !== null && (typeof ctx === "object" || typeof ctx === "function");
  const root = (trx: object) => {
    let t = trx;
    for (let p = parents.get(t); p !== undefined; p = parents.get(t)) t = p;
    return t;
  };
  const execute = conn.execute.bind(conn);
  const begin = conn.begin.bind(conn);
  const commit = conn.commit.bind(conn);
  conn.execute = async (query, params, method, ctx, ...rest) => {
    const writes = writesAnnouncedState(sqlText(query));
    const result = await execute(query, params, method, ctx, ...rest);
    if (writes) {
      if (isTrx(ctx)) dirty.add(root(ctx));
      else if (
        typeof query !== "string" &&
        (query as { client?: { transacting?: boolean } }).client?.transacting
      )
        untracked = true;
      else await afterCommit();
    }
    return result;
  };
  conn.begin = async (options) => {
    const trx = await begin(options);
    if (isTrx(options?.ctx) && isTrx(trx)) parents.set(trx, options.ctx);
    return trx;
  };
  conn.commit = async (ctx, ...rest) => {
    await commit(ctx, ...rest);
    if (!isTrx(ctx) || parents.has(ctx)) return;
    if (dirty.has(ctx) || untracked) {
      dirty.delete(ctx);
      untracked = false;
      await afterCommit();
    }
  };
}
