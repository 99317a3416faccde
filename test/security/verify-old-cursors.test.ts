import { createClient } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { KEPT_EVENTS } from "../../src/verification/revocation-catch-up.js";
import { clientFor, sharedInstances, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, short, verifierMachine } from "../machine-fixtures.js";
import { Watcher } from "../watch-fixtures.js";

/**
 * A caller holding `auth:verify` cannot empty every tenant's state cache at will. It collects
 * WatchRevocations cursors at many positions (one stream each), waits until more than
 * KEPT_EVENTS events have passed (their marks no longer kept), then sends them as
 * VerifyCredential's `min_revocation_position`. Before, each such cursor made the instance
 * read the feed's newest id and empty its whole state cache; now the instance reads the
 * cursor's event and the one it applied by primary key and keeps its cache. Over TLS, on
 * PostgreSQL (where the cache is), with the shipped KEPT_EVENTS: the events that pass are
 * written in one statement, as other tenants' revocations would be over time. The same once
 * retention deleted the cursors' events (a cursor older than a day, by default).
 */
describe("a caller cycling old cursors through VerifyCredential (postgres)", () => {
  const servers = sharedInstances("postgres", [{}]);

  it.each([
    ["fell out of those kept", false],
    ["retention deleted", true],
  ])(
    "does not empty the state cache for cursors whose events %s",
    async (_, pruned) => {
      const [s] = servers as [TestServer];
      const root = await adminLogin(s.connect());
      const verifier = await verifierMachine(s.connect(), root);
      const tokens = clientFor(TokenService, s.connect(), root);
      const { token } = await tokens.createPersonalAccessToken({ name: `other-${short()}` });
      const v = createClient(
        VerificationService,
        withHeaders(s.connect(), { authorization: `Bearer ${verifier}` }),
      );

      // Cursors at distinct positions: a revocation before each stream opens.
      const cursors: string[] = [];
      for (let i = 0; i < 20; i++) {
        const t = await tokens.createPersonalAccessToken({ name: `old-${short()}` });
        await tokens.revokePersonalAccessToken({ id: t.id });
        await expect
          .poll(() => s.app.revocations.position, { timeout: 10_000 })
          .toBeGreaterThanOrEqual(await lastEventId(s));
        const watcher = Watcher.open(s.connect(), verifier);
        await watcher.first();
        cursors.push(watcher.cursor);
        watcher.close();
      }
      expect(new Set(cursors).size).toBe(cursors.length);

      // More than KEPT_EVENTS events pass, read by the feed.
      await s.app.storage.em
        .fork()
        .execute(
          "insert into revocation_events (kind, subject_id, tenant_id, occurred_at) " +
            "select 'credential', 'passing-' || g, 'elsewhere', clock_timestamp() from generate_series(1, ?) g",
          [KEPT_EVENTS + 100],
        );
      const passed = await lastEventId(s);
      if (pruned) {
        // Retention, as the repository's prune does it (the mark raised first, then the delete):
        // every event but the newest 1,000, the cursors' own among them.
        const em = s.app.storage.em.fork();
        const bound = passed - 1_000;
        await em.execute(
          "update revocation_feed set pruned_through = ? where id = 1 and pruned_through < ?",
          [bound, bound],
        );
        await em.execute("delete from revocation_events where id <= ?", [bound]);
      }
      s.app.revocations.wake();
      await expect.poll(() => s.app.revocations.position, { timeout: 30_000 }).toBe(passed);

      const stats = () => s.app.sql.cacheStats();
      expect(stats().enabled).toBe(true);
      const before = stats();
      for (let round = 0; round < 2; round++)
        for (const cursor of cursors) {
          const answer = await v.verifyCredential({ credential: token, minRevocationPosition: cursor });
          expect(VerificationCode[answer.code]).toBe("VALID");
          // The other caller's verification, answered from the cache the cycling left alone.
          expect((await v.verifyCredential({ credential: token })).code).toBe(VerificationCode.VALID);
        }
      const after = stats();
      expect(after.invalidations - before.invalidations).toBe(0);
      expect(after.hits).toBeGreaterThan(before.hits);
    },
    120_000,
  );
});

/** The newest event's id in the database. */
async function lastEventId(s: TestServer): Promise<number> {
  const rows = await s.app.storage.em
    .fork()
    .execute<{ id: string | number | null }[]>("select max(id) as id from revocation_events");
  return Number(rows[0]?.id ?? 0);
}
