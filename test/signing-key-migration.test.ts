import { UniqueConstraintViolationException } from "@mikro-orm/core";
import { describe, expect, it } from "vitest";
import { SigningKey } from "../src/storage/entities.js";
import { DATABASES, migrateTo, migrationStorage } from "./helpers.js";

/**
 * The signing key schedule migration numbers existing keys in creation order and lets them
 * sign from their creation, as they did; a second key of one generation is refused.
 */
describe.each(DATABASES)("signing key schedule migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("numbers existing keys by creation and activates them at their creation", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", "Migration20261204213000_usernames_per_tenant");
    const knex = storage.em.fork().getKnex();
    const at = (s: number) => new Date(Date.parse("2026-11-01T00:00:00Z") + s * 1000);
    // Rows as the schema before this migration has them; two created in the same instant.
    const row = (kid: string, created: Date, retired: Date | null) => ({
      kid,
      alg: "EdDSA",
      private_jwk: "v1:x:y:z",
      public_jwk: "{}",
      created_at: created,
      retired_at: retired,
    });
    await knex("signing_keys").insert(row("c", at(20), null));
    await knex("signing_keys").insert(row("b", at(10), at(20)));
    await knex("signing_keys").insert(row("a", at(10), at(10)));

    await storage.migrate();
    const keys = await storage.em.fork().find(SigningKey, {}, { orderBy: { generation: "asc" } });
    expect(keys.map((k) => [k.kid, k.generation, k.activatesAt?.getTime()])).toEqual([
      ["a", 1, at(10).getTime()],
      ["b", 2, at(10).getTime()],
      ["c", 3, at(20).getTime()],
    ]);
    await expect(
      storage.em.fork().insert(SigningKey, {
        kid: "d",
        alg: "EdDSA",
        privateJwk: "x",
        publicJwk: "{}",
        createdAt: at(30),
        activatesAt: at(30),
        retiredAt: null,
        generation: 3,
      }),
    ).rejects.toBeInstanceOf(UniqueConstraintViolationException);
  });
});
