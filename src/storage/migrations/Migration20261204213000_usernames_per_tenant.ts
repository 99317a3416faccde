import { SchemaMigration } from "./schema-migration.js";

/**
 * Usernames unique per tenant, not globally: a global unique answered AlreadyExists to a
 * tenant admin for a name taken in another tenant (an existence oracle across tenants).
 * The unique was an index of its own on both databases (SQLite: a unique index; PostgreSQL:
 * a unique constraint), so no table is rebuilt. A plain index on username stays for the
 * tenant-less look-up of Login and HTTP Basic.
 *
 * `tenantless_login` marks the users that existed while usernames were global (every
 * existing row): they keep logging in with a username alone, as before. A user created
 * later outside the default tenant must name its tenant (see user-principal.ts for why).
 */
export class Migration20261204213000_usernames_per_tenant extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("users", (t) => {
        t.dropUnique(["username"], "users_username_unique");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("users", (t) => {
        t.unique(["tenant_id", "username"], { indexName: "users_tenant_id_username_unique" });
        t.index(["username"], "users_username_index");
        t.boolean("tenantless_login").notNullable().defaultTo(false);
      }),
    );
    this.addSql("update users set tenantless_login = true");
  }

  override async down(): Promise<void> {
    // Fails (as it should) when one username exists in two tenants.
    this.addSchema((schema) =>
      schema.alterTable("users", (t) => {
        t.dropIndex(["username"], "users_username_index");
        t.dropColumn("tenantless_login");
        t.dropUnique(["tenant_id", "username"], "users_tenant_id_username_unique");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("users", (t) => {
        t.unique(["username"], { indexName: "users_username_unique" });
      }),
    );
  }
}
