import type { SqlRunner } from "../sql.js";
import { toMillis } from "../sql.js";

/**
 * What a revocation event's id names (the `kind` column, written by the triggers of
 * Migration20261205100000_revocation_events), or `reset`: a watched table was truncated
 * (its id the table's name, its tenant `*`; Migration20261206080000_truncate_resets).
 */
export type RevocationKind = "credential" | "session" | "subject" | "tenant" | "reset";

/** One row of the revocation feed. */
export interface RevocationRecord {
  /** The feed's order: an id never becomes visible after a larger one. */
  id: number;
  kind: RevocationKind;
  /** The credential, session, subject or tenant id. */
  subjectId: string;
  tenantId: string;
  /** Epoch ms of the change. */
  occurredAt: number;
}

/** This database's feed: its id, and the largest event id retention deleted (0: none). */
export interface FeedInfo {
  databaseId: string;
  prunedThrough: number;
}

interface Row {
  id: number | string;
  kind: string;
  subject_id: string;
  tenant_id: string;
  occurred_at: unknown;
}

/**
 * The events' columns, `occurred_at` as epoch ms (SQLite stores it so). PostgreSQL's is
 * computed there: as text it takes the session's DateStyle, and the cursors' mark hashes it.
 */
const columns = (sqlite: boolean) =>
  `id, kind, subject_id, tenant_id, ${
    sqlite
      ? "occurred_at"
      : "(extract(epoch from date_trunc('milliseconds', occurred_at)) * 1000)::bigint as occurred_at"
  }`;
const queries = (sqlite: boolean) => {
  const c = columns(sqlite);
  return {
    AFTER: `select ${c} from revocation_events where id > ? order by id limit ?`,
    FROM: `select ${c} from revocation_events where id >= ? order by id limit ?`,
    AT: `select ${c} from revocation_events where id = ?`,
    NEWEST: `select ${c} from revocation_events order by id desc limit 1`,
    RANGE: `select ${c} from revocation_events where id > ? and id <= ? order by id limit ?`,
    RANGE_OF_TENANT: `select ${c} from revocation_events where tenant_id = ? and id > ? and id <= ? order by id limit ?`,
  };
};
const LAST_ID = "select max(id) as id from revocation_events";
/**
 * PostgreSQL: the sequences the events' id is drawn from, and how many ids a session draws
 * at once: the column's own (serial, identity) and any its default names (`nextval('s')`
 * with no OWNED BY, which pg_get_serial_sequence does not see).
 */
const ID_CACHE =
  "select s.seqrelid::regclass::text as sequence, s.seqcache as cache from pg_sequence s " +
  "where s.seqrelid = pg_get_serial_sequence('revocation_events', 'id')::regclass " +
  "or s.seqrelid in (select d.refobjid from pg_attrdef a join pg_depend d on d.classid = 'pg_attrdef'::regclass " +
  "and d.objid = a.oid and d.refclassid = 'pg_class'::regclass where a.adrelid = 'revocation_events'::regclass " +
  "and a.adnum = (select attnum from pg_attribute where attrelid = 'revocation_events'::regclass and attname = 'id')) " +
  "order by s.seqcache desc";
const OLDEST_ID = "select min(id) as id from revocation_events";
const FEED_INFO = "select database_id, pruned_through from revocation_feed where id = 1";
/**
 * How far retention may delete by age: the newest event older than the cut-off, one step
 * down the `occurred_at` index. Asked as `max(id) … where occurred_at < ?` (alone or or-ed
 * with the count bound) SQLite walked the ids down from the newest, every event kept.
 */
const NEWEST_BEFORE =
  "select id from revocation_events where occurred_at < ? order by occurred_at desc limit 1";
const MARK_PRUNED = "update revocation_feed set pruned_through = ? where id = 1 and pruned_through < ?";
const DELETE_RANGE = "delete from revocation_events where id > ? and id <= ?";
/** Ids per delete: a statement on SQLite holds the event loop while it runs. */
const DELETE_STEP = 5_000;

function record(r: Row): RevocationRecord {
  return {
    id: Number(r.id),
    kind: r.kind as RevocationKind,
    subjectId: r.subject_id,
    tenantId: r.tenant_id,
    occurredAt: toMillis(r.occurred_at) ?? 0,
  };
}

/**
 * The revocation feed's SQL. On SQLite the ORM and this share one connection, and a read
 * there while a transaction is open would see its uncommitted events (and, once it rolls
 * back, an id that will be drawn again): every read waits until no transaction is open.
 */
export class RevocationEventRepository {
  private readonly q: ReturnType<typeof queries>;

  constructor(private readonly sql: SqlRunner) {
    this.q = queries(sql.blocking === true);
  }

  /** Events after `afterId`, in order, at most `limit`. */
  async after(afterId: number, limit: number): Promise<RevocationRecord[]> {
    return (await this.read(() => this.sql.all<Row>(this.q.AFTER, [afterId, limit]))).map(record);
  }

  /** Events from `id` on (that one included), in order, at most `limit`. */
  async from(id: number, limit: number): Promise<RevocationRecord[]> {
    return (await this.read(() => this.sql.all<Row>(this.q.FROM, [id, limit]))).map(record);
  }

  /** The event at `id`, if there is one. */
  async at(id: number): Promise<RevocationRecord | undefined> {
    const row = await this.read(() => this.sql.get<Row>(this.q.AT, [id]));
    return row && record(row);
  }

  /** The newest event, if there is one. */
  async newest(): Promise<RevocationRecord | undefined> {
    const row = await this.read(() => this.sql.get<Row>(this.q.NEWEST, []));
    return row && record(row);
  }

  /**
   * PostgreSQL only: how many ids the events' sequence hands a session at once (the largest,
   * if the id draws from several; none: no sequence found). Above 1 a session draws ids
   * ahead, and one can commit after a larger id another drew later.
   */
  async idCache(): Promise<{ sequence: string; cache: number } | undefined> {
    const row = await this.sql.get<{ sequence: string; cache: number | string }>(ID_CACHE, []);
    return row && { sequence: row.sequence, cache: Number(row.cache) };
  }

  /** Events in (`afterId`, `throughId`], of one tenant (null: every tenant), at most `limit`. */
  async range(
    tenantId: string | null,
    afterId: number,
    throughId: number,
    limit: number,
  ): Promise<RevocationRecord[]> {
    const rows = await this.read(() =>
      tenantId === null
        ? this.sql.all<Row>(this.q.RANGE, [afterId, throughId, limit])
        : this.sql.all<Row>(this.q.RANGE_OF_TENANT, [tenantId, afterId, throughId, limit]),
    );
    return rows.map(record);
  }

  /** The newest event's id (0 when there is none). */
  async lastId(): Promise<number> {
    return Number(
      (await this.read(() => this.sql.get<{ id: number | string | null }>(LAST_ID, [])))?.id ?? 0,
    );
  }

  async info(): Promise<FeedInfo> {
    const row = await this.read(() =>
      this.sql.get<{ database_id: string; pruned_through: number | string }>(FEED_INFO, []),
    );
    if (!row) throw new Error("revocation_feed has no row: the database is not migrated");
    return { databaseId: row.database_id, prunedThrough: Number(row.pruned_through) };
  }

  /**
   * Delete events older than `before` or beyond the newest `keep`, never the newest one;
   * returns the largest id deleted (0: none). The mark is raised first: a reader that
   * races the delete sees the mark and answers `reset` rather than miss what went.
   */
  async prune(before: Date, keep: number): Promise<number> {
    const last = await this.lastId();
    const byAge = Number(
      (await this.read(() => this.sql.get<{ id: number | string | null }>(NEWEST_BEFORE, [before])))?.id ?? 0,
    );
    // The newest event is never pruned: it keeps the feed's position across restarts.
    const bound = Math.min(Math.max(byAge, last - keep), last - 1);
    if (bound <= 0) return 0;
    await this.read(() => this.sql.run(MARK_PRUNED, [bound, bound]));
    // From the oldest event on, in steps with a turn between them: a backlog (retention after
    // a long stop, or a lowered limit) never holds SQLite's one connection in one statement.
    for (let low = (await this.oldestId()) - 1; low < bound; low += DELETE_STEP) {
      const high = Math.min(low + DELETE_STEP, bound);
      await this.read(() => this.sql.run(DELETE_RANGE, [low, high]));
      if (high < bound) await new Promise((r) => setImmediate(r));
    }
    return bound;
  }

  /** The oldest event's id (0 when there is none). */
  private async oldestId(): Promise<number> {
    return Number(
      (await this.read(() => this.sql.get<{ id: number | string | null }>(OLDEST_ID, [])))?.id ?? 0,
    );
  }

  /** Run `query` once no transaction is open on SQLite's shared connection (checked in the same turn as the query starts). */
  private async read<T>(query: () => Promise<T>): Promise<T> {
    while (this.sql.inTransaction?.()) await new Promise((r) => setTimeout(r, 2));
    return query();
  }
}
