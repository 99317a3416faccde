import { afterEach, describe, expect, it } from "vitest";
import { initORM, isSchemaDroppedMeanwhile, type Storage } from "../src/storage/orm.js";
import { DATABASES, dropSchema, POSTGRES, SQLITE } from "./helpers.js";

/** What a query PostgreSQL must refuse rejects with. */
async function refusal(storage: Storage, sql: string): Promise<unknown> {
  try {
    await storage.em.getConnection().execute(sql);
  } catch (err) {
    return err;
  }
  throw new Error(`expected PostgreSQL to refuse: ${sql}`);
}

/** A real PostgreSQL error of the kind a concurrent DROP SCHEMA gives the migrator's look-up. */
function schemaGoneError(storage: Storage): Promise<unknown> {
  return refusal(storage, `select 'tessera_gone_schema.some_table'::regclass`);
}

describe.skipIf(!DATABASES.includes(POSTGRES))("migrate when another schema is dropped meanwhile", () => {
  const open: { storage: Storage; url: string }[] = [];
  afterEach(async () => {
    for (const { storage, url } of open.splice(0)) {
      await storage.close();
      await dropSchema(url);
    }
  });

  async function fresh(): Promise<Storage> {
    const url = POSTGRES.url();
    const storage = await initORM({ url, migrate: false });
    open.push({ storage, url });
    return storage;
  }

  it("recognises PostgreSQL's missing-schema and missing-table errors, and nothing else", async () => {
    const storage = await fresh();
    expect(isSchemaDroppedMeanwhile(await schemaGoneError(storage))).toBe(true);
    expect(isSchemaDroppedMeanwhile(await refusal(storage, "select * from tessera_no_such_table"))).toBe(
      true,
    );
    const syntax = await refusal(storage, "selec 1");
    expect(syntax).toBeInstanceOf(Error);
    expect(isSchemaDroppedMeanwhile(syntax)).toBe(false);
    expect(isSchemaDroppedMeanwhile(new Error("wrapped", { cause: await schemaGoneError(storage) }))).toBe(
      true,
    );
  });

  it("tries again and applies every migration once", async () => {
    const storage = await fresh();
    const migrator = storage.orm.getMigrator();
    const up = migrator.up.bind(migrator);
    let calls = 0;
    migrator.up = (async (...args: Parameters<typeof up>) => {
      calls++;
      // The first attempt meets what a neighbour's DROP SCHEMA does to the look-up.
      if (calls === 1) throw await schemaGoneError(storage);
      return up(...args);
    }) as typeof migrator.up;
    const applied = await storage.migrate();
    expect(calls).toBe(2);
    expect(applied.length).toBeGreaterThan(0);
    expect(await storage.migrate()).toEqual([]);
    const executed = await migrator.getExecutedMigrations();
    expect(executed.map((m) => m.name)).toEqual(applied);
  });

  it("gives up after a few attempts and reports the error", async () => {
    const storage = await fresh();
    const migrator = storage.orm.getMigrator();
    let calls = 0;
    migrator.up = (async () => {
      calls++;
      throw await schemaGoneError(storage);
    }) as typeof migrator.up;
    await expect(storage.migrate()).rejects.toThrow(/tessera_gone_schema/);
    expect(calls).toBe(4);
  });
});

describe("migrate on SQLite", () => {
  it("does not retry (no other schema can vanish there)", async () => {
    const storage = await initORM({ url: SQLITE.url(), migrate: false });
    try {
      const migrator = storage.orm.getMigrator();
      let calls = 0;
      migrator.up = (async () => {
        calls++;
        throw Object.assign(new Error("looks like a PostgreSQL error"), { code: "3F000" });
      }) as typeof migrator.up;
      await expect(storage.migrate()).rejects.toThrow("looks like");
      expect(calls).toBe(1);
    } finally {
      await storage.close();
    }
  });
});
