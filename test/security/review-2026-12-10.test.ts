import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import type { EventSubscriber } from "@mikro-orm/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { clientFor, DATABASES, POSTGRES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * The adversarial review of 2026-12-10 (bounded authority under concurrency: the RPCs that
 * change a principal, its certificate bindings, backends, applications or tokens, with no
 * PBKDF2 between their authority check and their write),
 * against a real server over TLS: each test is a finding of that review, failing on the main
 * it was found on, and holds with its fix.
 */
const PASSWORD = "correct horse battery staple";

describe.each(DATABASES)("review 2026-12-10 on $name", (db) => {
  let ts: TestServer;
  let t: Transport;
  let root: string;
  let applicationId: string;

  const login = async (username: string) =>
    (await createClient(UserService, t).login({ username, password: PASSWORD })).accessToken;

  /** A user of the default tenant holding `scopes`: its id, and its clients signed in. */
  async function userWith(scopes: string[]) {
    const username = `u-${short()}`;
    const { user } = await clients(t, root).users.createUser({ username, password: PASSWORD, scopes });
    const token = await login(username);
    return { id: user!.id, token, ...clients(t, token), tokens: clientFor(TokenService, t, token) };
  }

  /** A bearer machine user holding `scopes`, assigned to the application. */
  async function machineWith(scopes: string[]) {
    const res = await clients(t, root).machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes,
      applicationIds: [applicationId],
    });
    return { id: res.machineUser!.id, token: res.token };
  }

  /**
   * Promote the principal `id` of `table` to `*` (raw SQL, another statement than the
   * request's) as the request reads it: its authority check then passes on the row as read,
   * and its write comes after the promotion committed (a concurrent update by a `*` admin).
   */
  function promoteOnRead(id: string, table: "machine_users" | "users" = "machine_users") {
    return onRead(id, () => ts.app.sql.run(`update ${table} set scopes = ? where id = ?`, ["*", id]));
  }

  /** Run `action` (once) as the request reads the row `id`, before it goes on. */
  function onRead(id: string, action: () => Promise<unknown>) {
    let fired = false;
    let stopped = false;
    const subscriber: EventSubscriber = {
      async onLoad({ entity }) {
        if (fired || stopped || (entity as { id?: unknown }).id !== id) return;
        fired = true;
        await action();
      },
    };
    // Registered (not only added to the set): the request's fork shares this event manager,
    // whose listeners are indexed when a subscriber is registered. It stays registered,
    // inert once fired (the manager has no way to unregister one).
    ts.app.storage.em.getEventManager().registerSubscriber(subscriber);
    return { fired: () => fired, stop: () => (stopped = true) };
  }

  beforeAll(async () => {
    ts = await startTestServer(db);
    t = ts.connect();
    root = await adminLogin(t);
    applicationId = (await clients(t, root).tenants.createApplication({ name: `app-${short()}` }))
      .application!.id;
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  /** What became of `call`: "done", or the reason it was refused with. */
  async function outcome(call: Promise<unknown>): Promise<string> {
    try {
      await call;
      return "done";
    } catch (err) {
      return ConnectError.from(err).findDetails(ErrorInfoSchema)[0]?.reason ?? String(err);
    }
  }

  it("an unbind of a machine user promoted to * after the authority check removes nothing and ends none of its tokens", async () => {
    const attacker = await userWith(["admin:machine-users", "swarm:deploy"]);
    const target = await machineWith(["swarm:deploy"]);
    const san = `spiffe://review-2026-12-10/${short()}`;
    await clients(t, root).machines.bindCertificate({
      machineUserId: target.id,
      identity: { case: "sanUri", value: san },
    });
    const issued = await clients(t, target.token).machines.issueAccessToken({});
    const race = promoteOnRead(target.id);
    const result = await outcome(
      attacker.machines.unbindCertificate({
        machineUserId: target.id,
        identity: { case: "sanUri", value: san },
      }),
    ).finally(race.stop);
    expect(race.fired()).toBe(true);
    expect(result).toBe("FAILED_PRECONDITION");
    // Rolled back: the binding stands, and the access token the machine user had still works.
    const mu = (await clients(t, root).machines.getMachineUser({ id: target.id })).machineUser!;
    expect(mu.scopes).toEqual(["*"]);
    expect(mu.certificates.map((c) => c.sanUri)).toEqual([san]);
    expect((await clients(t, issued.accessToken).machines.checkAuthentication({})).machineUserId).toBe(
      target.id,
    );
  });

  it("a deregistration of the backend of a machine user promoted to * after the authority check removes nothing", async () => {
    const attacker = await userWith(["admin:machine-users", "swarm:deploy"]);
    const target = await machineWith(["swarm:deploy"]);
    const { backendId } = await clients(t, target.token).machines.registerBackend({
      applicationId,
      callbackUrl: `https://backend-${short()}.example.com/callback`,
      version: "1",
    });
    const race = promoteOnRead(target.id);
    const result = await outcome(attacker.machines.deregisterBackend({ id: backendId })).finally(race.stop);
    expect(race.fired()).toBe(true);
    expect(result).toBe("FAILED_PRECONDITION");
    const { backends } = await clients(t, root).machines.listBackends({ machineUserId: target.id });
    expect(backends.map((b) => b.id)).toEqual([backendId]);
  });

  it("a deregistration of a backend taken over by a * machine user after the authority check removes nothing", async () => {
    const attacker = await userWith(["admin:machine-users", "swarm:deploy"]);
    const weak = await machineWith(["swarm:deploy"]);
    const strong = await machineWith(["*"]);
    const { backendId } = await clients(t, weak.token).machines.registerBackend({
      applicationId,
      callbackUrl: `https://backend-${short()}.example.com/callback`,
      version: "1",
    });
    // The `*` machine user takes the backend over as the request reads its owner (the one checked).
    let fired = false;
    let stopped = false;
    ts.app.storage.em.getEventManager().registerSubscriber({
      async onLoad({ entity }) {
        if (fired || stopped || (entity as { id?: unknown }).id !== weak.id) return;
        fired = true;
        await ts.app.sql.run("update backends set machine_user_id = ? where id = ?", [strong.id, backendId]);
      },
    } satisfies EventSubscriber);
    const result = await outcome(attacker.machines.deregisterBackend({ id: backendId })).finally(() => {
      stopped = true;
    });
    expect(fired).toBe(true);
    // Before: "done", and the `*` machine user's backend was gone.
    expect(result).toBe("FAILED_PRECONDITION");
    const { backends } = await clients(t, root).machines.listBackends({ machineUserId: strong.id });
    expect(backends.map((b) => b.id)).toEqual([backendId]);
  });

  it("a backend taken over from a machine user promoted to * after the authority check stays its own", async () => {
    const attacker = await machineWith(["swarm:deploy"]);
    const target = await machineWith(["swarm:deploy"]);
    const callbackUrl = `https://backend-${short()}.example.com/callback`;
    const { backendId } = await clients(t, target.token).machines.registerBackend({
      applicationId,
      callbackUrl,
      version: "1",
    });
    const race = promoteOnRead(target.id);
    const result = await outcome(
      clients(t, attacker.token).machines.registerBackend({ applicationId, callbackUrl, version: "2" }),
    ).finally(race.stop);
    expect(race.fired()).toBe(true);
    expect(result).toBe("FAILED_PRECONDITION");
    const { backends } = await clients(t, root).machines.listBackends({ applicationId });
    expect(backends.filter((b) => b.id === backendId).map((b) => [b.machineUserId, b.version])).toEqual([
      [target.id, "1"],
    ]);
  });

  it("a backend taken over by a * machine user after the authority check of another take-over stays its", async () => {
    const attacker = await machineWith(["swarm:deploy"]);
    const weak = await machineWith(["swarm:deploy"]);
    const strong = await machineWith(["*"]);
    const callbackUrl = `https://backend-${short()}.example.com/callback`;
    const { backendId } = await clients(t, weak.token).machines.registerBackend({
      applicationId,
      callbackUrl,
      version: "1",
    });
    // The `*` machine user takes the backend over as the request reads its owner (the one checked).
    let fired = false;
    let stopped = false;
    ts.app.storage.em.getEventManager().registerSubscriber({
      async onLoad({ entity }) {
        if (fired || stopped || (entity as { id?: unknown }).id !== weak.id) return;
        fired = true;
        await ts.app.sql.run("update backends set machine_user_id = ? where id = ?", [strong.id, backendId]);
      },
    } satisfies EventSubscriber);
    const result = await outcome(
      clients(t, attacker.token).machines.registerBackend({ applicationId, callbackUrl, version: "2" }),
    ).finally(() => {
      stopped = true;
    });
    expect(fired).toBe(true);
    // Before: "done", and the backend was the attacker's.
    expect(result).toBe("FAILED_PRECONDITION");
    const { backends } = await clients(t, root).machines.listBackends({ applicationId });
    expect(backends.filter((b) => b.id === backendId).map((b) => [b.machineUserId, b.version])).toEqual([
      [strong.id, "1"],
    ]);
  });

  it("an application a machine user promoted to * after the authority check is assigned to is not deleted", async () => {
    const attacker = await userWith(["admin:tenants", "swarm:deploy"]);
    const app = (await clients(t, root).tenants.createApplication({ name: `app-${short()}` })).application!;
    const target = await machineWith(["swarm:deploy"]);
    await clients(t, root).machines.updateMachineUser({
      id: target.id,
      applicationIds: { applicationIds: [applicationId, app.id] },
    });
    const race = promoteOnRead(target.id);
    const result = await outcome(attacker.tenants.deleteApplication({ id: app.id })).finally(race.stop);
    expect(race.fired()).toBe(true);
    expect(result).toBe("FAILED_PRECONDITION");
    const mu = (await clients(t, root).machines.getMachineUser({ id: target.id })).machineUser!;
    expect(mu.applicationIds).toContain(app.id);
  });

  /** An application with a machine user holding swarm:deploy assigned, and a `*` one not (yet). */
  async function applicationWithWeakAndStrong() {
    const app = (await clients(t, root).tenants.createApplication({ name: `app-${short()}` })).application!;
    const weak = await machineWith(["swarm:deploy"]);
    await clients(t, root).machines.updateMachineUser({
      id: weak.id,
      applicationIds: { applicationIds: [applicationId, app.id] },
    });
    const strong = await machineWith(["*"]);
    const assignments = async () =>
      (await clients(t, root).machines.getMachineUser({ id: strong.id })).machineUser!.applicationIds;
    return { app, weak, strong, assignments };
  }

  it("an application a * machine user was assigned to after the authority check is not deleted", async () => {
    const attacker = await userWith(["admin:tenants", "swarm:deploy"]);
    const { app, weak, strong, assignments } = await applicationWithWeakAndStrong();
    // As the request reads the assigned machine users, a `*` admin assigns a `*` one (committed).
    const race = onRead(weak.id, () =>
      ts.app.sql.run(
        "insert into machine_user_applications (machine_user_id, application_id) values (?, ?)",
        [strong.id, app.id],
      ),
    );
    const result = await outcome(attacker.tenants.deleteApplication({ id: app.id })).finally(race.stop);
    expect(race.fired()).toBe(true);
    expect(result).toBe("FAILED_PRECONDITION");
    expect(await assignments()).toContain(app.id);
  });

  // SQLite runs one transaction at a time; PostgreSQL needs the application's row locked.
  it.skipIf(db !== POSTGRES)(
    "an application a * machine user's assignment to is being committed is not deleted when it commits",
    async () => {
      const attacker = await userWith(["admin:tenants", "swarm:deploy"]);
      const { app, strong, assignments } = await applicationWithWeakAndStrong();
      // A transaction of the test's (another connection) assigns the `*` machine user and
      // holds its commit while the deletion starts.
      const knex = ts.app.storage.em.getConnection().getKnex();
      let holder = 0;
      let release!: () => void;
      const released = new Promise<void>((resolve) => {
        release = resolve;
      });
      let held!: () => void;
      const holding = new Promise<void>((resolve) => {
        held = resolve;
      });
      const hold = knex.transaction(async (trx) => {
        holder = (await trx.raw("select pg_backend_pid() as pid")).rows[0].pid;
        await trx.raw(
          "insert into machine_user_applications (machine_user_id, application_id) values (?, ?)",
          [strong.id, app.id],
        );
        held();
        await released;
      });
      await holding;
      const deletion = outcome(attacker.tenants.deleteApplication({ id: app.id }));
      try {
        await expect
          .poll(
            async () =>
              (
                await knex.raw(
                  "select count(*)::int as n from pg_stat_activity where ?::int = any(pg_blocking_pids(pid))",
                  [holder],
                )
              ).rows[0].n,
          )
          .toBe(1);
      } finally {
        release();
        await hold;
      }
      expect(await deletion).toBe("FAILED_PRECONDITION");
      expect(await assignments()).toContain(app.id);
    },
  );

  it("a token of a user promoted to * after the authority check is not revoked by an admin:tokens holder", async () => {
    const attacker = await userWith(["admin:tokens", "cluster:read"]);
    const owner = await userWith(["cluster:read"]);
    const pat = await owner.tokens.createPersonalAccessToken({ name: "kept", scopes: [] });
    const race = promoteOnRead(owner.id, "users");
    const result = await outcome(attacker.tokens.revokePersonalAccessToken({ id: pat.id })).finally(
      race.stop,
    );
    expect(race.fired()).toBe(true);
    expect(result).toBe("FAILED_PRECONDITION");
    expect((await clients(t, pat.token).users.getCurrentUser({})).id).toBe(owner.id);
  });
});
