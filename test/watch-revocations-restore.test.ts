import { join } from "node:path";
import { type Client, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { App } from "../src/app.js";
import { createTesseraAuth, type TesseraAuth, TesseraAuthError } from "../src/sdk/server/index.js";
import { RevocationEventRepository } from "../src/storage/repositories/revocation-events.js";
import {
  clientFor,
  DATABASES,
  dropSchema,
  POSTGRES,
  startTestServer,
  type TestDatabase,
  type TestServer,
} from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";
import { earlierCursor, Watcher } from "./watch-fixtures.js";

/**
 * The revocation feed restored from a backup under a running instance (pg_restore, or a
 * point-in-time recovery the instance reconnects to; on SQLite the file's content put back):
 * its events and its id sequence are back where the backup left them, below the last id
 * the instance's feed read. The next revocations take ids the feed has read past: they must
 * still reach the streams (or end them, so that their clients empty their caches), never be
 * skipped while the streams heartbeat on; and a cursor taken before the restore must not
 * resume over them, however many ids were drawn since.
 */

/** The newest event's id now. */
async function newestId(app: App): Promise<number> {
  return Number(
    (await app.sql.get<{ id: number | null }>("select max(id) as id from revocation_events", []))?.id ?? 0,
  );
}

/**
 * The restore, in one transaction: the events after `backupAt` gone, the id sequence where
 * the backup left it; then `revoke` (ids of API tokens) revoked in the same commit, before
 * any reader can look (so they may take ids past the last one read).
 */
async function restore(app: App, db: TestDatabase, backupAt: number, revoke: string[] = []): Promise<void> {
  const pg = db.name === "postgres";
  await app.storage.em.fork().transactional(async (tx) => {
    await tx.execute("delete from revocation_events where id > ?", [backupAt]);
    if (pg)
      await tx.execute("select setval(pg_get_serial_sequence('revocation_events', 'id'), ?, ?)", [
        Math.max(backupAt, 1),
        backupAt > 0,
      ]);
    else await tx.execute("update sqlite_sequence set seq = ? where name = 'revocation_events'", [backupAt]);
    for (const id of revoke)
      await tx.execute("update api_tokens set revoked_at = ? where id = ?", [
        pg ? new Date() : Date.now(),
        id,
      ]);
  });
}

/** What a downstream service answers for `token`: "admitted" or "refused". */
const verdict = (auth: TesseraAuth, token: string) =>
  auth.authenticate(`Bearer ${token}`).then(
    () => "admitted",
    (e: unknown) => (e instanceof TesseraAuthError ? "refused" : String(e)),
  );

/** A user with a token client, and a machine user that may verify. */
async function setUp(ts: TestServer) {
  const plain = ts.connect();
  const admin = clients(plain, await adminLogin(plain));
  const verifier = (
    await admin.machines.createMachineUser({
      name: `v-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    })
  ).token;
  const username = `u-${short()}`;
  await admin.users.createUser({ username, password: "user password long", scopes: [] });
  const login = await createClient(UserService, plain).login({ username, password: "user password long" });
  return { plain, verifier, tokens: clientFor(TokenService, plain, login.accessToken) };
}

/** Events after the backup point, which the feed reads past (each PAT made and revoked: one event). */
async function eventsAfterBackup(tokens: Client<typeof TokenService>, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const p = await tokens.createPersonalAccessToken({ name: `spent-${short()}` });
    await tokens.revokePersonalAccessToken({ id: p.id });
  }
}

describe.each(DATABASES)("the revocation feed's ids going back on $name", (db) => {
  let ts: TestServer;
  const cores: TesseraAuth[] = [];
  const sdk = (verifier: string, server = ts) => {
    const auth = createTesseraAuth({
      server: server.server.url,
      caFile: join(server.certs.dir, "ca.crt"),
      credential: verifier,
      cache: { ttlSeconds: 3600 },
    });
    cores.push(auth);
    return auth;
  };

  beforeAll(async () => {
    ts = await startTestServer(db, { verification: { watchHeartbeatSeconds: 1 } });
  });
  afterAll(async () => {
    for (const c of cores) c.close();
    await ts?.close();
  });

  it("refuses a PAT revoked after the feed was restored to an earlier point, at a downstream service", async () => {
    const { verifier, tokens } = await setUp(ts);
    const backupAt = await newestId(ts.app);
    await eventsAfterBackup(tokens, 3);
    await expect.poll(() => ts.app.revocations.position).toBeGreaterThan(backupAt + 2);

    const pat = await tokens.createPersonalAccessToken({ name: "kept" });
    const auth = sdk(verifier);
    expect(await auth.ready(10_000)).toBe(true);
    await auth.authenticate(`Bearer ${pat.token}`);
    await auth.authenticate(`Bearer ${pat.token}`);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheHits: 1 });

    await restore(ts.app, db, backupAt);
    await tokens.revokePersonalAccessToken({ id: pat.id });
    // The downstream service stops admitting it (the event, or a reset of its cache).
    await expect.poll(() => verdict(auth, pat.token), { timeout: 10_000 }).toBe("refused");
  });

  it("refuses it too when more events than the ids gone back commit before the feed reads (once reset)", async () => {
    const { verifier, tokens } = await setUp(ts);
    // Revoked in the restore's commit after the kept PAT: their events take the ids past the feed's position.
    const extra: string[] = [];
    for (let i = 0; i < 8; i++)
      extra.push((await tokens.createPersonalAccessToken({ name: `extra-${i}` })).id);
    const pat = await tokens.createPersonalAccessToken({ name: "kept" });
    const backupAt = await newestId(ts.app);
    await eventsAfterBackup(tokens, 3);
    await expect.poll(() => ts.app.revocations.position).toBeGreaterThan(backupAt + 2);
    const auth = sdk(verifier);
    expect(await auth.ready(10_000)).toBe(true);
    await auth.authenticate(`Bearer ${pat.token}`);
    await auth.authenticate(`Bearer ${pat.token}`);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheHits: 1 });

    const before = ts.app.revocations.position;
    await restore(ts.app, db, backupAt, [pat.id, ...extra]);
    expect(await newestId(ts.app)).toBeGreaterThan(before);
    await expect.poll(() => verdict(auth, pat.token), { timeout: 10_000 }).toBe("refused");
    // One reset for one restore: the stream resumed from then on, and later events arrive as events.
    await expect.poll(() => auth.stats().watch).toMatchObject({ state: "up", connects: 2 });
    const later = await tokens.createPersonalAccessToken({ name: "later" });
    expect(await verdict(auth, later.token)).toBe("admitted");
    await tokens.revokePersonalAccessToken({ id: later.id });
    await expect.poll(() => verdict(auth, later.token), { timeout: 10_000 }).toBe("refused");
    expect(auth.stats().watch).toMatchObject({ resets: 1 });
  });

  it("answers reset to a cursor taken before the restore, though new ids passed it; not to one taken after", async () => {
    const { verifier, tokens } = await setUp(ts);
    const backupAt = await newestId(ts.app);
    await eventsAfterBackup(tokens, 2);
    await expect.poll(() => ts.app.revocations.position).toBeGreaterThan(backupAt + 1);
    const w = Watcher.open(ts.connect(), verifier);
    await w.first();
    const before = w.cursor;
    w.close();

    const spent = [];
    for (let i = 0; i < 4; i++) spent.push((await tokens.createPersonalAccessToken({ name: `s-${i}` })).id);
    await restore(ts.app, db, backupAt, spent);
    const resumed = Watcher.open(ts.connect(), verifier, before);
    await resumed.first();
    expect(resumed.messages[0]!.reset).toBe(true);
    expect(resumed.events).toEqual([]);
    // The cursor answered with the reset resumes (no second reset), with what came after it.
    await new Promise((r) => setTimeout(r, 300));
    const after = resumed.cursor;
    resumed.close();
    const pat = await tokens.createPersonalAccessToken({ name: "after" });
    await tokens.revokePersonalAccessToken({ id: pat.id });
    const again = Watcher.open(ts.connect(), verifier, after);
    await again.until(() => again.events.some((e) => e.endsWith(pat.id)));
    expect(again.messages.some((m) => m.reset)).toBe(false);
    again.close();
  });
  it("resumes a cursor of the version before marks by its position (a rolling upgrade), past the end reset", async () => {
    const { verifier, tokens } = await setUp(ts);
    const at = await newestId(ts.app);
    const pat = await tokens.createPersonalAccessToken({ name: "earlier-cursor" });
    await tokens.revokePersonalAccessToken({ id: pat.id });
    const { database_id: databaseId } = (await ts.app.sql.get<{ database_id: string }>(
      "select database_id from revocation_feed where id = 1",
      [],
    ))!;
    const w = Watcher.open(ts.connect(), verifier, earlierCursor(databaseId, at));
    await w.until(() => w.events.some((e) => e.endsWith(pat.id)));
    expect(w.messages.some((m) => m.reset)).toBe(false);
    w.close();
    const past = Watcher.open(
      ts.connect(),
      verifier,
      earlierCursor(databaseId, (await newestId(ts.app)) + 10),
    );
    await past.first();
    expect(past.messages[0]!.reset).toBe(true);
    past.close();
  });
});

describe("the revocation feed's ids going back under several instances (PostgreSQL)", () => {
  const servers: TestServer[] = [];
  const cores: TesseraAuth[] = [];
  let url = "";

  beforeAll(async () => {
    url = POSTGRES.url();
    const shared: TestDatabase = { name: "postgres", url: () => url };
    for (let i = 0; i < 2; i++)
      servers.push(await startTestServer(shared, { verification: { watchHeartbeatSeconds: 1 } }));
  });
  afterAll(async () => {
    for (const c of cores) c.close();
    for (const s of servers) await s.close();
    await dropSchema(url);
  });

  it("resets each instance's clients once per restore, and refuses the PAT revoked after it on both", async () => {
    const [a, b] = servers as [TestServer, TestServer];
    const { verifier, tokens } = await setUp(a);
    const extra: string[] = [];
    for (let i = 0; i < 6; i++)
      extra.push((await tokens.createPersonalAccessToken({ name: `extra-${i}` })).id);
    const pat = await tokens.createPersonalAccessToken({ name: "kept" });
    const backupAt = await newestId(a.app);
    await eventsAfterBackup(tokens, 3);
    for (const s of servers)
      await expect.poll(() => s.app.revocations.position).toBeGreaterThan(backupAt + 2);
    const auths = servers.map((s) => {
      const auth = createTesseraAuth({
        server: s.server.url,
        caFile: join(s.certs.dir, "ca.crt"),
        credential: verifier,
        cache: { ttlSeconds: 3600 },
      });
      cores.push(auth);
      return auth;
    });
    for (const auth of auths) {
      expect(await auth.ready(10_000)).toBe(true);
      expect(await verdict(auth, pat.token)).toBe("admitted");
    }

    await restore(b.app, POSTGRES, backupAt, [pat.id, ...extra]);
    for (const auth of auths)
      await expect.poll(() => verdict(auth, pat.token), { timeout: 10_000 }).toBe("refused");
    // Later events, and retention's pruning, reset nothing more.
    for (const s of servers)
      await new RevocationEventRepository(s.app.sql).prune(new Date(Date.now() + 60_000), 1);
    const later = await tokens.createPersonalAccessToken({ name: "later" });
    for (const auth of auths) expect(await verdict(auth, later.token)).toBe("admitted");
    await tokens.revokePersonalAccessToken({ id: later.id });
    for (const auth of auths)
      await expect.poll(() => verdict(auth, later.token), { timeout: 10_000 }).toBe("refused");
    await new Promise((r) => setTimeout(r, 2500));
    for (const auth of auths) expect(auth.stats().watch).toMatchObject({ resets: 1 });
  });
});
