import { describe, expect, it } from "vitest";
import { DATABASES, insertEarlyUser, migrateTo, migrationStorage } from "./helpers.js";

const BEFORE = "Migration20261206020000_binder_authority";
const LINEAGE = "Migration20261206050000_token_lineage";

/**
 * The token-lineage migration records nothing for the tokens made before it (what made them
 * is not known): they keep working and their revocation revokes no other. Down drops the
 * column again and keeps the rows.
 */
describe.each(DATABASES)("token lineage migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("leaves existing tokens made with nothing known, and drops the column on the way down", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", BEFORE);
    const at = new Date("2026-12-01T10:00:00Z");
    const knex = storage.em.fork().getKnex();
    await insertEarlyUser(storage, at);
    const token = (id: string) => ({
      id,
      public_id: id.padEnd(16, "0"),
      kind: "pat",
      tenant_id: "t1",
      owner_user_id: "u1",
      name: id,
      scopes: "",
      secret_hash: "x",
      hint: "h",
      created_at: at,
    });
    await knex("api_tokens").insert([token("a"), token("b")]);

    await migrateTo(storage, "up", LINEAGE);
    expect(
      (await knex("api_tokens").select("id", "made_with_token_id").orderBy("id")).map((r) => [
        r.id,
        r.made_with_token_id,
      ]),
    ).toEqual([
      ["a", null],
      ["b", null],
    ]);

    await migrateTo(storage, "down", BEFORE);
    await expect(knex("api_tokens").select("made_with_token_id")).rejects.toThrow(/made_with_token_id/);
    expect((await knex("api_tokens").select("id").orderBy("id")).map((r) => r.id)).toEqual(["a", "b"]);
  });
});
