import { describe, expect, it } from "vitest";
import { RefreshToken, Session } from "../src/storage/entities.js";
import { DATABASES, insertEarlyUser, migrateTo, migrationStorage } from "./helpers.js";

/**
 * The sessions migration gives every refresh-token family that existed before it a
 * session row, revoked when the family was, so an ended session stays ended and a live
 * one can be refreshed into access tokens that name it.
 */
describe.each(DATABASES)("sessions migration ($name)", (db) => {
  const fresh = migrationStorage(db);

  it("backfills one session per existing refresh-token family, revoked when the family was", async () => {
    const storage = await fresh.open();
    await migrateTo(storage, "up", "Migration20261123110000_machine_users");
    const em = storage.em.fork();
    const at = new Date("2026-11-30T10:00:00Z");
    await insertEarlyUser(storage, at);
    const token = (id: string, familyId: string, minutes: number, revoked: boolean) => ({
      id,
      familyId,
      userId: "u1",
      tokenHash: id.padEnd(64, "0"),
      createdAt: new Date(at.getTime() + minutes * 60_000),
      expiresAt: new Date(at.getTime() + 86_400_000),
      spentAt: null,
      revokedAt: revoked ? new Date(at.getTime() + 3_600_000) : null,
    });
    await em.insertMany(RefreshToken, [
      token("a1", "live", 0, false),
      token("a2", "live", 5, false),
      token("b1", "ended", 1, true),
      token("b2", "ended", 2, true),
    ]);
    await storage.migrate();
    const sessions = await storage.em.fork().find(Session, {}, { orderBy: { id: "asc" } });
    expect(
      sessions.map((s) => ({
        id: s.id,
        userId: s.userId,
        createdAt: s.createdAt.getTime(),
        revoked: s.revokedAt !== null && s.revokedAt !== undefined,
      })),
    ).toEqual([
      { id: "ended", userId: "u1", createdAt: at.getTime() + 60_000, revoked: true },
      { id: "live", userId: "u1", createdAt: at.getTime(), revoked: false },
    ]);
  });
});
