import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createTesseraAuth, type TesseraAuth, TesseraAuthError } from "../src/sdk/server/index.js";
import { clientFor, POSTGRES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * The revocation feed restored from a backup under a running instance (pg_restore, or a
 * point-in-time recovery the instance reconnects to): its events and its id sequence are
 * back where the backup left them, below the last id the instance's feed read. The next
 * revocations take ids the feed has read past: they must still reach the streams (or end
 * them, so that their clients empty their caches), never be skipped while the streams
 * heartbeat on.
 */
describe("the revocation feed's ids going back (PostgreSQL)", () => {
  let ts: TestServer;
  const cores: TesseraAuth[] = [];

  beforeAll(async () => {
    ts = await startTestServer(POSTGRES, { verification: { watchHeartbeatSeconds: 1 } });
  });
  afterAll(async () => {
    for (const c of cores) c.close();
    await ts?.close();
  });

  it("refuses a PAT revoked after the feed was restored to an earlier point, at a downstream service", async () => {
    const plain = ts.connect();
    const admin = clients(plain, await adminLogin(plain));
    const verifier = (
      await admin.machines.createMachineUser({
        name: `v-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    const knex = ts.app.storage.em.fork().getKnex();
    const backupAt = Number(
      (await knex.raw("select coalesce(max(id), 0) as id from revocation_events")).rows[0].id,
    );
    // Events after the backup: the feed reads past it.
    const username = `u-${short()}`;
    await admin.users.createUser({ username, password: "user password long", scopes: [] });
    const login = await createClient(UserService, plain).login({ username, password: "user password long" });
    const tokens = clientFor(TokenService, plain, login.accessToken);
    for (let i = 0; i < 3; i++) {
      const p = await tokens.createPersonalAccessToken({ name: `spent-${i}` });
      await tokens.revokePersonalAccessToken({ id: p.id });
    }
    await expect.poll(() => ts.app.revocations.position).toBeGreaterThan(backupAt + 2);

    const pat = await tokens.createPersonalAccessToken({ name: "kept" });
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      cache: { ttlSeconds: 3600 },
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    await auth.authenticate(`Bearer ${pat.token}`);
    await auth.authenticate(`Bearer ${pat.token}`);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheHits: 1 });

    // The restore: the events after the backup gone, the sequence where the backup left it.
    await knex.raw("delete from revocation_events where id > ?", [backupAt]);
    await knex.raw("select setval(pg_get_serial_sequence('revocation_events', 'id'), ?, true)", [
      Math.max(backupAt, 1),
    ]);
    await tokens.revokePersonalAccessToken({ id: pat.id });
    // The downstream service stops admitting it (the event, or a reset of its cache).
    await expect
      .poll(
        async () =>
          auth.authenticate(`Bearer ${pat.token}`).then(
            () => "admitted",
            (e: unknown) => (e instanceof TesseraAuthError ? "refused" : String(e)),
          ),
        { timeout: 10_000 },
      )
      .toBe("refused");
  });
});
