import { SchemaMigration } from "./schema-migration.js";

/**
 * `actor_outside` on audit events: the actor is not of the event's tenant (a `*` principal
 * acting on another tenant's object, the static admin token), so that tenant's readers see
 * it as the platform, never by its id. 0 or 1 (not a boolean: the
 * audit rows are written by raw statements whose values both databases must read alike).
 * Existing rows are 0, and rightly: until now every
 * event filed in a tenant was of an actor of that tenant, or of none (the events of `*`
 * principals were filed in their own tenant, then in none).
 */
export class Migration20261206070000_audit_actor_outside extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("audit_events", (t) => {
        t.smallint("actor_outside").notNullable().defaultTo(0);
      }),
    );
  }

  override async down(): Promise<void> {
    // Plain SQL, as in the proven_bindings migration (knex's SQLite dropColumn rebuilds the
    // table with queries of its own that a compiled migration does not carry).
    this.addSql("alter table audit_events drop column actor_outside");
  }
}
