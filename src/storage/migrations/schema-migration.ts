import type { Knex } from "@mikro-orm/knex";
import { Migration } from "@mikro-orm/migrations";

/**
 * Base of our migrations: schema changes written with knex's schema builder, so one
 * migration serves SQLite and PostgreSQL. A builder may compile to several statements
 * (a table and its indexes); each is added on its own because better-sqlite3 runs one
 * statement per call.
 */
export abstract class SchemaMigration extends Migration {
  /** Add every statement of a schema builder to this migration. */
  protected addSchema(build: (schema: Knex.SchemaBuilder) => Knex.SchemaBuilder): void {
    const compiled = build(this.getKnex().schema).toSQL() as unknown as { sql: string }[] | { sql: string };
    for (const statement of Array.isArray(compiled) ? compiled : [compiled]) this.addSql(statement.sql);
  }
}
