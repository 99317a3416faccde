import { join } from "node:path";
import { Code, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { RevocationKind as K } from "../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuth, type TesseraAuth, TesseraAuthError } from "../src/sdk/server/index.js";
import {
  clientFor,
  DATABASES,
  migrateTo,
  migrationStorage,
  POSTGRES,
  SQLITE,
  startTestServer,
  type TestServer,
} from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";
import { Watcher } from "./watch-fixtures.js";

/**
 * A TRUNCATE of a table the revocation feed watches fires no row trigger: against a real
 * server over TLS, run on a connection of its own as an operator's psql would, it must
 * reset every WatchRevocations stream (and every older cursor), so that an SDK core stops
 * answering from its cache; rolled back, it announces nothing. SQLite has no TRUNCATE: its
 * `delete` without `where` makes the row events.
 */
async function fixture(ts: TestServer) {
  const plain = ts.connect();
  const root = await adminLogin(plain);
  const admin = clients(plain, root);
  const tenantId = (await admin.tenants.createTenant({ name: `trunc-${short()}` })).tenant!.id;
  const machine = (scopes: string[], tenant?: string) =>
    admin.machines.createMachineUser({
      ...(tenant ? { tenantId: tenant } : {}),
      name: `mu-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes,
    });
  const verifierToken = (await machine(["auth:verify"], tenantId)).token;
  const superToken = (await machine(["*"])).token;
  /** A PAT of a new user of the tenant. */
  async function aPat(): Promise<{ id: string; token: string }> {
    const username = `u-${short()}`;
    await admin.users.createUser({ username, password: "user password long", scopes: [], tenantId });
    const login = await createClient(UserService, plain).login({
      username,
      password: "user password long",
      tenant: tenantId,
    });
    return clientFor(TokenService, plain, login.accessToken).createPersonalAccessToken({ name: "cli" });
  }
  return { plain, admin, machine, verifierToken, superToken, aPat };
}

describe.skipIf(!DATABASES.includes(POSTGRES))("a TRUNCATE of a watched table (postgres)", () => {
  let ts: TestServer;
  let f: Awaited<ReturnType<typeof fixture>>;
  const open: Watcher[] = [];
  const cores: TesseraAuth[] = [];
  const watch = (auth: string, cursor = "", transport?: Transport) => {
    const w = Watcher.open(transport ?? f.plain, auth, cursor);
    open.push(w);
    return w;
  };
  /** SQL on a pool connection of its own (not the app's listening session), as psql would run it. */
  const knex = () => ts.app.storage.em.fork().getKnex();

  beforeAll(async () => {
    ts = await startTestServer(POSTGRES, { verification: { watchHeartbeatSeconds: 1 } });
    f = await fixture(ts);
  });
  afterEach(() => {
    for (const w of open.splice(0)) w.close();
    for (const c of cores.splice(0)) c.close();
  });
  afterAll(async () => {
    await ts?.close();
  });

  it("resets every stream and every older cursor, and an SDK core asks Tessera again; rolled back, nothing", async () => {
    const pat = await f.aPat();
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: f.verifierToken,
      cache: { ttlSeconds: 3600 },
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    await auth.authenticate(`Bearer ${pat.token}`);
    await auth.authenticate(`Bearer ${pat.token}`);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheHits: 1 });

    const tenantWatch = watch(f.verifierToken);
    const everyTenant = watch(f.superToken);
    await tenantWatch.first();
    await everyTenant.first();
    const before = tenantWatch.cursor;

    // Rolled back: no reset. A revocation committed after it shows the streams read past it.
    await expect(
      knex().transaction(async (trx) => {
        await trx.raw("truncate api_tokens");
        throw new Error("roll back");
      }),
    ).rejects.toThrow("roll back");
    const other = await f.aPat();
    await knex().raw("update api_tokens set revoked_at = now() where id = ?", [other.id]);
    await tenantWatch.event(K.CREDENTIAL, other.id);
    await everyTenant.event(K.CREDENTIAL, other.id);
    expect([...tenantWatch.messages, ...everyTenant.messages].some((m) => m.reset)).toBe(false);
    await auth.authenticate(`Bearer ${pat.token}`);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheHits: 2 });

    await knex().raw("truncate api_tokens");
    for (const w of [tenantWatch, everyTenant])
      await w.until(() => w.messages.some((m) => m.reset), 10_000, "reset");
    expect(tenantWatch.ended).toBeUndefined();
    await expect.poll(() => auth.stats().watch?.resets).toBeGreaterThanOrEqual(1);
    expect(auth.stats().cacheSize).toBe(0);
    // The PAT is gone: Tessera is asked, and refuses it.
    await expect(auth.authenticate(`Bearer ${pat.token}`)).rejects.toBeInstanceOf(TesseraAuthError);
    expect(auth.stats().verifyCalls).toBe(2);
    expect(auth.watching()).toBe(true);

    // A cursor from before the truncation cannot resume; one from after it can.
    const resumed = watch(f.verifierToken, before);
    await resumed.first();
    expect(resumed.messages[0]!.reset).toBe(true);
    const after = watch(f.verifierToken, tenantWatch.cursor);
    await after.first();
    expect(after.messages[0]!.reset).toBe(false);
  });

  it("never lets a truncation's reset carry a stream past an event naming its own caller", async () => {
    const caller = await f.machine(["*"]);
    const w = watch(caller.token);
    await w.first();
    // One commit: the caller's own change, then a truncation. The stream must end before
    // that change, not answer reset with a cursor past it.
    await knex().transaction(async (trx) => {
      await trx.raw("update machine_users set scopes = ? where id = ?", ["* extra", caller.machineUser!.id]);
      await trx.raw("truncate api_tokens");
    });
    expect(await w.end()).toMatchObject({ code: Code.Unavailable });
    expect(w.messages.some((m) => m.reset)).toBe(false);
    // Resumed (authenticated again) from its last cursor: the truncation resets it.
    const again = watch(caller.token, w.cursor);
    await again.first();
    expect(again.messages[0]!.reset).toBe(true);
  });

  it("resets the streams for a commit truncating several watched tables", async () => {
    const spare = (await f.admin.tenants.createTenant({ name: `spare-${short()}` })).tenant!.id;
    const w = watch(f.superToken);
    await w.first();
    // Sessions too: every login ends (the admin's as well), hence the tenant disabled by SQL below.
    await knex().transaction(async (trx) => {
      await trx.raw("truncate sessions, machine_user_applications cascade");
      await trx.raw("truncate api_tokens");
    });
    await w.until(() => w.messages.some((m) => m.reset), 10_000, "reset");
    await knex().raw("update tenants set disabled = true where id = ?", [spare]);
    await w.event(K.TENANT, spare);
    // Its reset events (one per table) are never sent as events.
    expect(w.messages.flatMap((m) => m.events).every((e) => e.kind !== K.UNSPECIFIED)).toBe(true);
  });
});

describe.skipIf(!DATABASES.includes(POSTGRES))("the truncation migration (postgres)", () => {
  const fresh = migrationStorage(POSTGRES);

  it("migrates down (a truncation then commits no event) and up again", async () => {
    const storage = await fresh.open();
    const knex = storage.em.fork().getKnex();
    const events = async () => Number((await knex("revocation_events").count({ n: "*" }))[0]!.n);
    await migrateTo(storage, "up", "Migration20261206080000_truncate_resets");
    await knex.raw("truncate sessions cascade");
    expect(await events()).toBe(1);
    await migrateTo(storage, "down", "Migration20261206070000_audit_actor_outside");
    expect((await knex.raw("select to_regclass('revocation_truncations') as t")).rows[0].t).toBeNull();
    await knex.raw("truncate sessions cascade");
    expect(await events()).toBe(1);
    await migrateTo(storage, "up", "Migration20261206080000_truncate_resets");
    await knex.raw("truncate sessions cascade");
    expect(await events()).toBe(2);
  });
});

describe("a delete of every row (sqlite: no TRUNCATE)", () => {
  let ts: TestServer;
  afterAll(async () => {
    await ts?.close();
  });

  it("makes the row events", async () => {
    ts = await startTestServer(SQLITE, { verification: { watchHeartbeatSeconds: 1 } });
    const f = await fixture(ts);
    const pat = await f.aPat();
    const w = Watcher.open(f.plain, f.verifierToken);
    await w.first();
    await ts.app.sql.run("delete from api_tokens", []);
    ts.app.revocations.wake();
    await w.event(K.CREDENTIAL, pat.id);
    w.close();
  });
});
