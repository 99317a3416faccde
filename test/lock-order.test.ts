import { randomBytes } from "node:crypto";
import type { Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import type { Knex } from "@mikro-orm/knex";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { POSTGRES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";
import { outcome, pgHolds } from "./pg-holds.js";
import { mintBackend } from "./security/fixtures.js";

/**
 * DeleteApplication against UpdateMachineUser and DeleteMachineUser on PostgreSQL, each pair
 * interleaved at the point where the two took their row locks in opposite orders (a
 * deadlock: PostgreSQL ends one after deadlock_timeout, 40P01, answered Unavailable). A
 * transaction of the test's own (another connection) holds a lock one RPC needs, so that the
 * other can be started at a chosen point; each step waits on pg_blocking_pids, not on time.
 * With one lock order (src/storage/lock-order.ts) both RPCs succeed, or one is refused
 * with what it means (NotFound). SQLite runs one write transaction at a time: no such
 * interleaving exists there.
 */
describe("lock order on PostgreSQL", () => {
  let ts: TestServer;
  let t: Transport;
  let root: ReturnType<typeof clients>;
  let knex: Knex;

  beforeAll(async () => {
    // Waits are bounded by the conditions below, not by the 5 s statement timeout (a loaded
    // machine could take longer than that to get the second RPC to its lock).
    // mTLS optional: a bind over a connection presenting the certificate proves possession.
    ts = await startTestServer(POSTGRES, {
      server: { mtls: "optional" },
      database: { statementTimeoutMs: 60_000 },
    });
    t = ts.connect();
    root = clients(t, await adminLogin(t));
    knex = ts.app.storage.em.getConnection().getKnex();
  }, 120_000);

  afterAll(async () => {
    await ts?.close();
  });

  const { blockedBy, waiterOn, hold } = pgHolds(() => knex);

  async function application() {
    return (await root.tenants.createApplication({ name: `app-${short()}` })).application!.id;
  }

  /** A bearer machine user holding swarm:deploy, assigned to `applicationIds`. */
  async function machineUser(applicationIds: string[]) {
    const res = await root.machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["swarm:deploy"],
      applicationIds,
    });
    return { id: res.machineUser!.id, token: res.token };
  }

  const assignments = async (id: string) =>
    (await root.machines.getMachineUser({ id })).machineUser!.applicationIds;

  it("a deletion of an application and an update keeping a machine user on it do not deadlock", async () => {
    const app = await application();
    const other = await application();
    const mu = await machineUser([app]);
    // The deletion is held once it has the application's row (on the machine user's lock,
    // which the update's foreign-key checks do not need).
    const holder = await hold("select id from machine_users where id = ? for no key update", [mu.id]);
    let deletion!: Promise<string>;
    let update!: Promise<string>;
    try {
      deletion = outcome(root.tenants.deleteApplication({ id: app }));
      const deleter = await waiterOn(holder.pid);
      // The update assigns the application again: it waits for the deletion's lock on it
      // (before: while holding the machine user's old assignment rows, the deletion's cascade).
      update = outcome(
        root.machines.updateMachineUser({ id: mu.id, applicationIds: { applicationIds: [app, other] } }),
      );
      await waiterOn(deleter);
    } finally {
      await holder.release();
    }
    // Before: one of them ended by the deadlock detector, UNAVAILABLE (503).
    expect([await deletion, await update]).toEqual(["done", "NOT_FOUND"]);
    expect(await assignments(mu.id)).toEqual([]);
  });

  it("a deletion of an application and an update taking a machine user off it do not deadlock", async () => {
    const app = await application();
    const other = await application();
    const mu = await machineUser([app]);
    // The update is held on its write to the machine user's row (a share lock the deletion's
    // share lock does not wait for).
    const holder = await hold("select id from machine_users where id = ? for share", [mu.id]);
    let deletion!: Promise<string>;
    let update!: Promise<string>;
    try {
      update = outcome(
        root.machines.updateMachineUser({ id: mu.id, applicationIds: { applicationIds: [other] } }),
      );
      const updater = await waiterOn(holder.pid);
      // Before: the update held the machine user's assignment rows, and the deletion's
      // cascade waited for them while holding its share lock on the machine user.
      let settled = false;
      deletion = outcome(root.tenants.deleteApplication({ id: app })).finally(() => {
        settled = true;
      });
      await expect.poll(async () => settled || (await blockedBy(updater)).length > 0).toBe(true);
    } finally {
      await holder.release();
    }
    expect([await deletion, await update]).toEqual(["done", "done"]);
    expect(await assignments(mu.id)).toEqual([other]);
  });

  /**
   * A DeleteMachineUser of `mu` held in its cascade, with the machine user's row locked, on a
   * credential row the test locks (credentials are the first rows the cascade deletes: their
   * foreign key is the oldest); then `rival` started. What became of both, once `rival`
   * waited for the deletion.
   */
  async function againstDeletion(mu: string, credentialLock: string, rival: () => Promise<unknown>) {
    const holder = await hold(
      `select id from machine_credentials where machine_user_id = ? ${credentialLock}`,
      [mu],
    );
    let removal!: Promise<string>;
    let other!: Promise<string>;
    try {
      removal = outcome(root.machines.deleteMachineUser({ id: mu }));
      const remover = await waiterOn(holder.pid);
      other = outcome(rival());
      await waiterOn(remover);
    } finally {
      await holder.release();
    }
    return [await removal, await other];
  }

  it("a deletion of an application and of a machine user with a backend on it do not deadlock", async () => {
    const app = await application();
    const mu = await machineUser([app]);
    await clients(t, mu.token).machines.registerBackend({
      applicationId: app,
      callbackUrl: `https://backend-${short()}.example.com/callback`,
      version: "1",
    });
    // Before: the application's deletion locked the backend, then waited for the machine
    // user; the machine user's cascade then waited for the backend.
    const result = await againstDeletion(mu.id, "for update", () =>
      root.tenants.deleteApplication({ id: app }),
    );
    expect(result).toEqual(["done", "done"]);
    const { backends } = await root.machines.listBackends({});
    expect(backends.filter((b) => b.applicationId === app)).toEqual([]);
  });

  it("a deletion of an application refuses, deleting nothing, when a backend changes owner between its read and its lock", async () => {
    const app = await application();
    const owner = await machineUser([app]);
    // Assigned to nothing: not among the machine users the deletion reads (nor checks its authority over).
    const taker = await machineUser([]);
    const { backendId } = await clients(t, owner.token).machines.registerBackend({
      applicationId: app,
      callbackUrl: `https://backend-${short()}.example.com/callback`,
      version: "1",
    });
    // The deletion holds the application's row and has read its machine users and backends
    // (unlocked); it is held on its share lock of the owner, before it locks the backends.
    const holder = await hold("select id from machine_users where id = ? for no key update", [owner.id]);
    let deletion!: Promise<string>;
    try {
      deletion = outcome(root.tenants.deleteApplication({ id: app }));
      await waiterOn(holder.pid);
      // The backend changes owner in that window (committed at once: it waits for no lock
      // the deletion holds yet), to one whose scopes the deletion never checked.
      await knex("backends").where({ id: backendId }).update({ machine_user_id: taker.id });
    } finally {
      await holder.release();
    }
    expect(await deletion).toBe("FAILED_PRECONDITION");
    // Nothing was deleted: the application, the owner's assignment, the backend (now the taker's).
    expect((await root.tenants.getApplication({ id: app })).application?.id).toBe(app);
    expect(await assignments(owner.id)).toEqual([app]);
    const { backends } = await root.machines.listBackends({});
    expect(backends.filter((b) => b.id === backendId).map((b) => b.machineUserId)).toEqual([taker.id]);
  });

  it("a deletion of a machine user and an unbinding of its certificate do not deadlock", async () => {
    const mu = await machineUser([]);
    const sha256Fingerprint = randomBytes(32).toString("hex");
    await root.machines.bindCertificate({
      machineUserId: mu.id,
      identity: { case: "sha256Fingerprint", value: sha256Fingerprint },
    });
    // Before: the unbinding deleted the binding, then waited for the machine user's row (its
    // revocation cut-off); the deletion's cascade then waited for the binding.
    const result = await againstDeletion(mu.id, "for update", () =>
      root.machines.unbindCertificate({
        machineUserId: mu.id,
        identity: { case: "sha256Fingerprint", value: sha256Fingerprint },
      }),
    );
    expect(result).toEqual(["done", "NOT_FOUND"]);
  });

  it("a deletion of a machine user and a rotation of its credentials do not deadlock", async () => {
    const mu = await machineUser([]);
    // Two credentials: the current one, and the previous one for 30 days more.
    await root.machines.rotateMachineUserCredentials({ id: mu.id, gracePeriodSeconds: 30 * 24 * 3600 });
    // The deletion is held on the previous credential (the test's lock); the rotation ends
    // the current one, then waits for the previous one too (its grace shortened).
    const result = await againstDeletion(mu.id, "and expires_at is not null for update", () =>
      root.machines.rotateMachineUserCredentials({ id: mu.id, gracePeriodSeconds: 60 }),
    );
    // Before: the rotation held the current credential and waited for the machine user's row
    // (its new credential's foreign key), which the deletion held while its cascade waited
    // for the credentials.
    expect(result).toEqual(["done", "NOT_FOUND"]);
  });

  it("a deletion of a machine user and a proven bind displacing its unproven binding do not deadlock", async () => {
    // The squatter's unproven binding of a certificate's fingerprint, in this tenant.
    const squatter = await machineUser([]);
    const backend = await mintBackend(ts, `spiffe://lock-order.example/${short()}`);
    const identity = { case: "sha256Fingerprint" as const, value: backend.fingerprint };
    await root.machines.bindCertificate({ machineUserId: squatter.id, identity });
    // The certificate's holder, in another tenant, binds it over a connection presenting it.
    const { tenant } = await root.tenants.createTenant({ name: `tenant-${short()}` });
    const owner = await root.machines.createMachineUser({
      name: `mu-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: [],
      tenantId: tenant!.id,
    });
    const presenting = createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca, cert: backend.cert, key: backend.key },
    });
    const token = await adminLogin(t);
    // Before: the bind deleted the squatter's binding, then waited for its row (the revocation
    // cut-off); the deletion's cascade then waited for the binding (503 after deadlock_timeout).
    const result = await againstDeletion(squatter.id, "for update", () =>
      clients(presenting, token).machines.bindCertificate({
        machineUserId: owner.machineUser!.id,
        identity,
      }),
    );
    expect(result).toEqual(["done", "done"]);
  });

  it("of two provers of one unproven binding, the second is refused and does not rewrite the first one's binder scopes", async () => {
    const mu = await machineUser([]);
    const backend = await mintBackend(ts, `spiffe://lock-order.example/${short()}`);
    const identity = { case: "sha256Fingerprint" as const, value: backend.fingerprint };
    const { binding } = await root.machines.bindCertificate({ machineUserId: mu.id, identity });
    const presenting = createConnectTransport({
      baseUrl: ts.server.url,
      httpVersion: "2",
      nodeOptions: { ca: ts.certs.ca, cert: backend.cert, key: backend.key },
    });
    // The test's transaction stands for the first prover, not committed yet: the second (this
    // RPC) reads the binding unproven and waits at its own write.
    const holder = await hold(
      "update machine_user_certificates set proven = true, binder_scopes = 'first-prover' where id = ?",
      [binding!.id],
    );
    let proof!: Promise<string>;
    try {
      const token = await adminLogin(t);
      proof = outcome(
        clients(presenting, token).machines.bindCertificate({ machineUserId: mu.id, identity }),
      );
      await waiterOn(holder.pid);
    } finally {
      await holder.release();
    }
    // Before: "done", the first prover's binder scopes replaced by the second's.
    expect(await proof).toBe("ALREADY_EXISTS");
    const { rows } = await knex.raw("select binder_scopes from machine_user_certificates where id = ?", [
      binding!.id,
    ]);
    expect(rows).toEqual([{ binder_scopes: "first-prover" }]);
  });
});
