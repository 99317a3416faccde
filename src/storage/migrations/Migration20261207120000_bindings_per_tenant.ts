import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { SchemaMigration } from "./schema-migration.js";

const TABLE = "machine_user_certificates";

/** The revocation-event triggers of the table (Migration20261205100000_revocation_events, SQLite), as it wrote them. */
function sqliteEventTriggers(): string[] {
  const now = "cast((julianday('now') - 2440587.5) * 86400000 as integer)";
  const event = (row: string) =>
    "insert into revocation_events (kind, subject_id, tenant_id, occurred_at) " +
    `select 'subject', ${row}.machine_user_id, p.tenant_id, ${now} from machine_users p where p.id = ${row}.machine_user_id; end`;
  return [
    `create trigger tessera_revocation_${TABLE}_update after update on ${TABLE} for each row when ` +
      "(old.machine_user_id is not new.machine_user_id or old.sha256_fingerprint is not new.sha256_fingerprint " +
      `or old.san_uri is not new.san_uri or old.proven is not new.proven) begin ${event("new")}`,
    `create trigger tessera_revocation_${TABLE}_delete after delete on ${TABLE} for each row begin ${event("old")}`,
    `create trigger tessera_revocation_${TABLE}_insert after insert on ${TABLE} for each row begin ${event("new")}`,
  ];
}

/**
 * SQLite cannot add a NOT NULL column with a foreign key, nor drop one: the table is copied
 * into a new one of the wanted shape (`tenant`: with tenant_id), which takes its name; its
 * indexes and its revocation-event triggers are made again (a dropped table takes them).
 * Nothing references the table, so dropping it checks no foreign key.
 */
function sqliteRebuild(tenant: boolean): string[] {
  const next = `${TABLE}_next`;
  return [
    `create table \`${next}\` (\`id\` varchar(36), \`machine_user_id\` varchar(36) not null, ` +
      (tenant ? "`tenant_id` varchar(36) not null, " : "") +
      "`sha256_fingerprint` varchar(64) null, `san_uri` varchar(2048) null, `created_at` datetime not null, " +
      "`proven` boolean not null default '0', `binder_scopes` text null, " +
      "foreign key(`machine_user_id`) references `machine_users`(`id`) on delete CASCADE, " +
      (tenant ? "foreign key(`tenant_id`) references `tenants`(`id`) on delete CASCADE, " : "") +
      "primary key (`id`))",
    `insert into \`${next}\` (id, machine_user_id, ${tenant ? "tenant_id, " : ""}sha256_fingerprint, san_uri, created_at, proven, binder_scopes) ` +
      `select b.id, b.machine_user_id, ${tenant ? "m.tenant_id, " : ""}b.sha256_fingerprint, b.san_uri, b.created_at, b.proven, b.binder_scopes ` +
      `from \`${TABLE}\` b join machine_users m on m.id = b.machine_user_id`,
    `drop table \`${TABLE}\``,
    `alter table \`${next}\` rename to \`${TABLE}\``,
    `create index \`${TABLE}_machine_user_id_index\` on \`${TABLE}\` (\`machine_user_id\`)`,
    ...sqliteEventTriggers(),
  ];
}

/**
 * Certificate bindings per tenant: `tenant_id` (the machine user's; machine users never
 * change tenant) and identities unique per tenant, no longer across tenants. A global unique
 * answered AlreadyExists for another tenant's binding (an existence oracle through the wall)
 * and made one tenant's binding displace or block another's; now each tenant keeps its own,
 * and which one a certificate authenticates as is decided at authentication
 * (machineOfCertificate). Plain indexes on the fingerprint and the SAN URI keep the
 * per-request look-up by either an index scan across tenants.
 *
 * Down fails (as it should) when one identity is bound in two tenants.
 */
export class Migration20261207120000_bindings_per_tenant extends SchemaMigration {
  override async up(): Promise<void> {
    if (this.driver instanceof PostgreSqlDriver) {
      this.addSql(`alter table "${TABLE}" add column "tenant_id" varchar(36) null`);
      this.addSql(
        `update "${TABLE}" b set "tenant_id" = m."tenant_id" from "machine_users" m where m."id" = b."machine_user_id"`,
      );
      this.addSql(`alter table "${TABLE}" alter column "tenant_id" set not null`);
      this.addSql(
        `alter table "${TABLE}" add constraint "${TABLE}_tenant_id_foreign" foreign key ("tenant_id") ` +
          `references "tenants" ("id") on delete CASCADE`,
      );
      this.addSql(`alter table "${TABLE}" drop constraint "${TABLE}_sha256_fingerprint_unique"`);
      this.addSql(`alter table "${TABLE}" drop constraint "${TABLE}_san_uri_unique"`);
    } else {
      for (const statement of sqliteRebuild(true)) this.addSql(statement);
    }
    this.addSchema((schema) =>
      schema.alterTable(TABLE, (t) => {
        t.unique(["tenant_id", "sha256_fingerprint"], {
          indexName: `${TABLE}_tenant_id_sha256_fingerprint_unique`,
        });
        t.unique(["tenant_id", "san_uri"], { indexName: `${TABLE}_tenant_id_san_uri_unique` });
        t.index(["sha256_fingerprint"], `${TABLE}_sha256_fingerprint_index`);
        t.index(["san_uri"], `${TABLE}_san_uri_index`);
      }),
    );
  }

  override async down(): Promise<void> {
    if (this.driver instanceof PostgreSqlDriver) {
      this.addSql(`drop index "${TABLE}_san_uri_index"`);
      this.addSql(`drop index "${TABLE}_sha256_fingerprint_index"`);
      this.addSql(`alter table "${TABLE}" drop constraint "${TABLE}_tenant_id_san_uri_unique"`);
      this.addSql(`alter table "${TABLE}" drop constraint "${TABLE}_tenant_id_sha256_fingerprint_unique"`);
      this.addSql(`alter table "${TABLE}" drop column "tenant_id"`);
    } else {
      for (const statement of sqliteRebuild(false)) this.addSql(statement);
    }
    this.addSchema((schema) =>
      schema.alterTable(TABLE, (t) => {
        t.unique(["sha256_fingerprint"], { indexName: `${TABLE}_sha256_fingerprint_unique` });
        t.unique(["san_uri"], { indexName: `${TABLE}_san_uri_unique` });
      }),
    );
  }
}
