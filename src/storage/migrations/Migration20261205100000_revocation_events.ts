import { randomUUID } from "node:crypto";
import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { SchemaMigration } from "./schema-migration.js";

/**
 * One source of revocation events per state table: which kind of event it makes, how the
 * event's id and tenant are found from the changed row (`r`: OLD or NEW), which changes of
 * an existing row matter to a verification (an UPDATE matching none makes no event: the
 * last-used flush and the stored digest never do), and whether inserts and deletes count.
 * Listed here rather than imported: a shipped migration must not change when the code does.
 */
interface Source {
  table: string;
  kind: "credential" | "session" | "subject" | "tenant";
  /** SQL of the event's id, over the row alias `r`. */
  id: string;
  /** SQL of the tenant id: a column of `r`, or a look-up in a parent (null when it is gone). */
  tenant: { column: string } | { parent: "users" | "machine_users"; key: string };
  /** An UPDATE makes an event when this holds (`o` old row, `n` new row; `{ne}` null-safe inequality). */
  update: string;
  insert?: boolean;
  /** A DELETE makes an event when this holds over `o` (default: always). */
  delete?: string;
}

/** Expiry set where there was none, or moved earlier. */
const SHORTENED = "(n.expires_at is not null and (o.expires_at is null or n.expires_at < o.expires_at))";

const changed = (...columns: string[]) => columns.map((c) => `o.${c} {ne} n.${c}`).join(" or ");

/** A Source condition in a dialect: `{ne}` its null-safe inequality, `o.`/`n.` the trigger's OLD and NEW. */
function condition(sql: string, ne: string): string {
  return sql.replaceAll("{ne}", ne).replace(/\bo\./g, "old.").replace(/\bn\./g, "new.");
}

const SOURCES: Source[] = [
  { table: "tenants", kind: "tenant", id: "r.id", tenant: { column: "id" }, update: changed("disabled") },
  {
    table: "users",
    kind: "subject",
    id: "r.id",
    tenant: { column: "tenant_id" },
    update: changed("password_hash", "scopes", "disabled", "tenant_id"),
  },
  {
    table: "machine_users",
    kind: "subject",
    id: "r.id",
    tenant: { column: "tenant_id" },
    update: changed(
      "disabled",
      "scopes",
      "tenant_id",
      "name",
      "auth_type",
      "rotated_at",
      "rotation_grace_until",
    ),
  },
  {
    table: "api_tokens",
    kind: "credential",
    id: "r.id",
    tenant: { column: "tenant_id" },
    update: `${changed("revoked_at", "scopes", "secret_hash", "owner_user_id", "tenant_id", "public_id")} or ${SHORTENED}`,
    // A revoked token made its event when it was revoked.
    delete: "o.revoked_at is null",
  },
  {
    table: "machine_credentials",
    kind: "credential",
    id: "r.id",
    tenant: { parent: "machine_users", key: "machine_user_id" },
    update: `${changed("secret_hash", "public_id", "machine_user_id")} or ${SHORTENED}`,
  },
  {
    table: "machine_user_applications",
    kind: "subject",
    id: "r.machine_user_id",
    tenant: { parent: "machine_users", key: "machine_user_id" },
    update: changed("machine_user_id", "application_id"),
    insert: true,
  },
  {
    table: "machine_user_certificates",
    kind: "subject",
    id: "r.machine_user_id",
    tenant: { parent: "machine_users", key: "machine_user_id" },
    update: changed("machine_user_id", "sha256_fingerprint", "san_uri", "proven"),
    insert: true,
  },
  {
    // An ended session made its event when it ended: the pruner deleting it later makes none.
    table: "sessions",
    kind: "session",
    id: "r.id",
    tenant: { parent: "users", key: "user_id" },
    update: changed("revoked_at", "user_id"),
    delete: "o.revoked_at is null",
  },
];

/**
 * The feed of revocation events behind VerificationService.WatchRevocations: one row per
 * committed change that can make a cached verification answer wrong, written by triggers
 * on the state tables, so that every code path (the ORM, raw SQL, psql, paths added later)
 * makes its events and no such change commits without them. `id` is the feed's order and
 * the cursor's basis; `revocation_feed` holds this database's id (a cursor of another
 * database is refused) and how far retention pruned (an older cursor cannot resume).
 *
 * Events name the row's tenant; a row whose parent is gone in the same transaction (a
 * machine credential deleted with its machine user, a session with its user) makes none:
 * the parent's own event (SUBJECT) covers it.
 *
 * Commit order: a reader keeps only the last id it read, so an id must never become
 * visible after a larger one. SQLite has one writer at a time. On PostgreSQL the triggers
 * are constraint triggers deferred to COMMIT, and each takes one transaction-level
 * advisory lock (per schema) before inserting: ids are then drawn in commit order, the
 * lock is held only from the commit's start to its end, and nothing else is locked after
 * it (so it cannot deadlock with the row locks the transaction took before). Their WHEN
 * conditions are checked at once, so an irrelevant update queues nothing. Enabled ALWAYS,
 * like the state notify triggers (a `replica` session writes events too). TRUNCATE makes
 * no event (no row trigger sees it): Migration20261206080000_truncate_resets commits a reset.
 */
export class Migration20261205100000_revocation_events extends SchemaMigration {
  override async up(): Promise<void> {
    const pg = this.driver instanceof PostgreSqlDriver;
    this.addSchema((schema) =>
      schema.createTable("revocation_events", (t) => {
        t.bigIncrements("id");
        t.string("kind", 16).notNullable();
        t.string("subject_id", 64).notNullable();
        t.string("tenant_id", 36).notNullable();
        t.datetime("occurred_at", { useTz: true }).notNullable();
        t.index(["tenant_id", "id"], "revocation_events_tenant_id_id_index");
        t.index(["occurred_at"], "revocation_events_occurred_at_index");
      }),
    );
    this.addSchema((schema) =>
      schema.createTable("revocation_feed", (t) => {
        t.integer("id").primary();
        t.string("database_id", 36).notNullable();
        t.bigInteger("pruned_through").notNullable().defaultTo(0);
      }),
    );
    this.addSql(
      `insert into revocation_feed (id, database_id, pruned_through) values (1, '${randomUUID()}', 0)`,
    );
    if (pg) this.pgTriggers();
    else this.sqliteTriggers();
  }

  private pgTriggers(): void {
    const branches = SOURCES.map((s) => {
      const tenant =
        "column" in s.tenant
          ? `t := r.${s.tenant.column};`
          : `select p.tenant_id into t from ${s.tenant.parent} p where p.id = r.${s.tenant.key};`;
      return `when '${s.table}' then k := '${s.kind}'; i := ${s.id}; ${tenant}`;
    });
    this.addSql(
      "create or replace function tessera_revocation_event() returns trigger language plpgsql as $$ " +
        "declare r record; k text; i text; t text; " +
        "begin " +
        "if tg_op = 'DELETE' then r := old; else r := new; end if; " +
        `case tg_table_name ${branches.join(" ")} else return null; end case; ` +
        "if t is null then return null; end if; " +
        "perform pg_advisory_xact_lock(hashtext(tg_table_schema || '.revocation_events')); " +
        "insert into revocation_events (kind, subject_id, tenant_id, occurred_at) values (k, i, t, clock_timestamp()); " +
        "return null; " +
        "end $$",
    );
    for (const s of SOURCES) {
      const triggers: [string, string, string | undefined][] = [
        ["update", "update", condition(s.update, "is distinct from")],
        ["delete", "delete", s.delete && condition(s.delete, "is distinct from")],
      ];
      if (s.insert) triggers.push(["insert", "insert", undefined]);
      for (const [name, op, when] of triggers) {
        const trigger = `tessera_revocation_${name}`;
        this.addSql(
          `create constraint trigger ${trigger} after ${op} on ${s.table} deferrable initially deferred ` +
            `for each row ${when ? `when (${when}) ` : ""}execute function tessera_revocation_event()`,
        );
        this.addSql(`alter table ${s.table} enable always trigger ${trigger}`);
      }
    }
  }

  private sqliteTriggers(): void {
    // Milliseconds since the epoch, as the ORM stores datetimes on SQLite.
    const now = "cast((julianday('now') - 2440587.5) * 86400000 as integer)";
    for (const s of SOURCES) {
      const ops: [string, string, string | undefined][] = [
        ["update", "new", condition(s.update, "is not")],
        ["delete", "old", s.delete && condition(s.delete, "is not")],
      ];
      if (s.insert) ops.push(["insert", "new", undefined]);
      for (const [op, row, when] of ops) {
        const id = s.id.replace(/\br\./g, `${row}.`);
        const insert =
          "column" in s.tenant
            ? `select '${s.kind}', ${id}, ${row}.${s.tenant.column}, ${now}`
            : `select '${s.kind}', ${id}, p.tenant_id, ${now} from ${s.tenant.parent} p where p.id = ${row}.${s.tenant.key}`;
        this.addSql(
          `create trigger tessera_revocation_${s.table}_${op} after ${op} on ${s.table} for each row ` +
            `${when ? `when (${when}) ` : ""}begin ` +
            `insert into revocation_events (kind, subject_id, tenant_id, occurred_at) ${insert}; end`,
        );
      }
    }
  }

  override async down(): Promise<void> {
    const pg = this.driver instanceof PostgreSqlDriver;
    for (const s of SOURCES) {
      for (const op of ["update", "delete", "insert"]) {
        if (op === "insert" && !s.insert) continue;
        this.addSql(
          pg
            ? `drop trigger if exists tessera_revocation_${op} on ${s.table}`
            : `drop trigger if exists tessera_revocation_${s.table}_${op}`,
        );
      }
    }
    if (pg) this.addSql("drop function if exists tessera_revocation_event()");
    this.addSchema((schema) => schema.dropTableIfExists("revocation_feed"));
    this.addSchema((schema) => schema.dropTableIfExists("revocation_events"));
  }
}
