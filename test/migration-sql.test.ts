import { existsSync, readFileSync, writeFileSync } from "node:fs";
import type { Migration } from "@mikro-orm/migrations";
import { describe, expect, it } from "vitest";
import { MIGRATIONS } from "../src/storage/migrations/index.js";
import { DATABASES, migrationStorage } from "./helpers.js";

/** A v4 UUID a migration draws at random (the revocation feed's database id): compared as a placeholder. */
const RANDOM_UUID = /'[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}'/g;
const statements = (m: Migration): string[] =>
  m.getQueries().map((q) => String(q).replace(RANDOM_UUID, "'<uuid v4>'"));

type MigrationClass = new (...args: ConstructorParameters<typeof Migration>) => Migration;

/** Where each database's statements are kept, as the migrations emitted them when they shipped. */
const fixture = (db: string): URL => new URL(`./fixtures/migration-sql.${db}.json`, import.meta.url);

/**
 * A migration that has shipped must emit the same SQL forever: a database migrated by an
 * older release and a fresh one must end in the same schema. So every migration's `up()`
 * and `down()` statements, on SQLite and PostgreSQL, are compared byte for byte with those
 * recorded when it was written (a refactoring of a migration's code is safe only if they
 * stay the same). `TESSERA_RECORD_MIGRATION_SQL=1` records the statements of migrations the
 * fixture does not name yet (a new one; then `npx biome format --write test/fixtures`); it
 * never rewrites a recorded one.
 */
describe.each(DATABASES)("migration SQL ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("emits, up and down, the very statements each migration emitted when it shipped", async () => {
    const storage = await fresh.open();
    const driver = storage.em.getDriver();
    const emitted: Record<string, { up: string[]; down: string[] }> = {};
    for (const { name, class: cls } of MIGRATIONS) {
      const migration = new (cls as MigrationClass)(driver, storage.orm.config);
      await migration.up();
      const up = statements(migration);
      migration.reset();
      await migration.down();
      emitted[name] = { up, down: statements(migration) };
    }
    const file = fixture(db.name);
    const recorded = existsSync(file) ? (JSON.parse(readFileSync(file, "utf8")) as typeof emitted) : {};
    if (process.env.TESSERA_RECORD_MIGRATION_SQL === "1") {
      writeFileSync(file, `${JSON.stringify({ ...emitted, ...recorded }, null, 2)}\n`);
      return;
    }
    expect(emitted).toEqual(recorded);
  });
});
