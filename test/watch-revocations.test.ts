import { randomUUID } from "node:crypto";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { RevocationKind as K, VerificationService } from "../gen/tessera/v1/verification_service_pb.js";
import { RevocationEventRepository } from "../src/storage/repositories/revocation-events.js";
import { CursorCodec } from "../src/verification/revocation-cursor.js";
import { clientFor, DATABASES, SQLITE, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, basic, clients, short, verifierMachine } from "./machine-fixtures.js";
import { Watcher } from "./watch-fixtures.js";

/**
 * VerificationService.WatchRevocations against a real server over TLS: every kind of change
 * makes its event (and a last-used flush none), resuming from a cursor, resets, the tenant
 * wall, heartbeats, the auth rule, the three protocols, the stream limits and the drain.
 */

/** The session id (`sid`) of an access token. */
function sidOf(jwt: string): string {
  return JSON.parse(Buffer.from(jwt.split(".")[1]!, "base64url").toString("utf8")).sid as string;
}

describe.each(DATABASES)("WatchRevocations on $name", (db) => {
  let ts: TestServer;
  let plain: Transport;
  let root: string;
  let tenantId: string;
  let applicationId: string;
  /** The tenant's verifier (auth:verify) and a `*` one. */
  let verifierToken: string;
  let superToken: string;
  let admin: ReturnType<typeof clients>;
  const open: Watcher[] = [];
  const watch = (auth: string | Record<string, string>, cursor = "", transport?: Transport) => {
    const w = Watcher.open(transport ?? plain, auth, cursor);
    open.push(w);
    return w;
  };

  /** A user of the tenant, logged in, with a PAT. */
  async function aUser(tenant = tenantId) {
    const username = `u-${short()}`;
    const user = (
      await admin.users.createUser({
        username,
        password: "user password long",
        scopes: ["workflows:read"],
        tenantId: tenant,
      })
    ).user!;
    const login = await createClient(UserService, plain).login({
      username,
      password: "user password long",
      tenant,
    });
    const tokens = clientFor(TokenService, plain, login.accessToken);
    const pat = await tokens.createPersonalAccessToken({ name: "cli", scopes: ["workflows:read"] });
    return { user, username, login, tokens, pat };
  }

  /** A machine user of the tenant (assigned to the application when asked: the assignment makes an event). */
  async function aMachine(extra: { assigned?: boolean } = {}) {
    const res = await admin.machines.createMachineUser({
      tenantId,
      name: `mu-${short()}`,
      authType: MachineAuthType.BEARER,
      applicationIds: extra.assigned ? [applicationId] : [],
      scopes: ["workflows:run"],
    });
    return res;
  }

  /** The credential id VerifyCredential gives a credential. */
  async function credentialIdOf(credential: string): Promise<string> {
    const answer = await clientFor(VerificationService, plain, verifierToken).verifyCredential({
      credential,
    });
    expect(answer.valid).toBe(true);
    return answer.credentialId;
  }

  beforeAll(async () => {
    ts = await startTestServer(db, {
      server: { mtls: "optional" },
      verification: { watchHeartbeatSeconds: 1, watchMaxStreamsPerCaller: 6 },
    });
    plain = ts.connect();
    root = await adminLogin(plain);
    admin = clients(plain, root);
    const { tenant } = await admin.tenants.createTenant({ name: `watch-${short()}` });
    tenantId = tenant!.id;
    applicationId = (await admin.tenants.createApplication({ tenantId, name: "workflows" })).application!.id;
    verifierToken = await verifierMachine(plain, root, tenantId);
    superToken = (
      await admin.machines.createMachineUser({
        name: `super-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["*"],
      })
    ).token;
  });
  afterAll(async () => {
    for (const w of open) w.close();
    await ts?.close();
  });

  it("answers at once with a heartbeat carrying the current cursor", async () => {
    const w = watch(verifierToken);
    await w.first();
    const m = w.messages[0]!;
    expect(m.events).toEqual([]);
    expect(m.reset).toBe(false);
    expect(m.heartbeatSeconds).toBe(1);
    expect(m.cursor).toMatch(/^[A-Za-z0-9_-]{20,}$/);
    w.close();
  });

  it("sends an event for a revoked personal access token and API key", async () => {
    const w = watch(verifierToken);
    await w.first();
    const u = await aUser();
    const key = await u.tokens.createApiKey({ name: "k" });
    await u.tokens.revokePersonalAccessToken({ id: u.pat.id });
    await w.event(K.CREDENTIAL, u.pat.id);
    await u.tokens.revokeApiKey({ id: key.id });
    await w.event(K.CREDENTIAL, key.id);
    const events = w.messages.flatMap((m) => m.events);
    expect(events.every((e) => e.tenantId === tenantId)).toBe(true);
    expect(events.every((e) => e.occurredAt !== undefined)).toBe(true);
    w.close();
  });

  it("sends an event for each change of a session or a user", async () => {
    const w = watch(verifierToken);
    await w.first();
    // Logout ends the session.
    const a = await aUser();
    await createClient(UserService, plain).logout({ refreshToken: a.login.refreshToken });
    await w.event(K.SESSION, sidOf(a.login.accessToken));
    // Re-using a spent refresh token ends its session.
    const b = await aUser();
    const users = createClient(UserService, plain);
    await users.refreshToken({ refreshToken: b.login.refreshToken });
    await expect(users.refreshToken({ refreshToken: b.login.refreshToken })).rejects.toThrow();
    await w.event(K.SESSION, sidOf(b.login.accessToken));
    // Password change, disable, scope change, deletion: the user.
    const c = await aUser();
    await clientFor(UserService, plain, c.login.accessToken).changePassword({
      currentPassword: "user password long",
      newPassword: "another password long",
    });
    await w.event(K.SUBJECT, c.user.id);
    const d = await aUser();
    await admin.users.updateUser({ id: d.user.id, disabled: true });
    await w.event(K.SUBJECT, d.user.id);
    const e = await aUser();
    await admin.users.updateUser({ id: e.user.id, scopes: { scopes: [] } });
    await w.event(K.SUBJECT, e.user.id);
    const f = await aUser();
    await admin.users.deleteUser({ id: f.user.id });
    await w.event(K.SUBJECT, f.user.id);
    w.close();
  });

  it("sends an event for each change of a machine user or its credentials", async () => {
    const w = watch(verifierToken);
    await w.first();
    // Rotation without grace: the machine token's credential goes, and its subject changes.
    const m1 = await aMachine();
    const cred1 = await credentialIdOf(m1.token);
    await admin.machines.rotateMachineUserCredentials({ id: m1.machineUser!.id, gracePeriodSeconds: 0 });
    await w.event(K.CREDENTIAL, cred1);
    await w.event(K.SUBJECT, m1.machineUser!.id);
    // Rotation with a grace period: the old credential's expiry is shortened.
    const m2 = await aMachine();
    const cred2 = await credentialIdOf(m2.token);
    await admin.machines.rotateMachineUserCredentials({ id: m2.machineUser!.id, gracePeriodSeconds: 600 });
    await w.event(K.CREDENTIAL, cred2);
    // Disable, delete, assignment removal.
    const m3 = await aMachine();
    await admin.machines.updateMachineUser({ id: m3.machineUser!.id, disabled: true });
    await w.event(K.SUBJECT, m3.machineUser!.id);
    const m4 = await aMachine();
    await admin.machines.deleteMachineUser({ id: m4.machineUser!.id });
    await w.event(K.SUBJECT, m4.machineUser!.id);
    const m5 = await aMachine({ assigned: true });
    await w.event(K.SUBJECT, m5.machineUser!.id);
    const count5 = () => w.events.filter((x) => x === `SUBJECT:${m5.machineUser!.id}`).length;
    await admin.machines.updateMachineUser({
      id: m5.machineUser!.id,
      applicationIds: { applicationIds: [] },
    });
    await w.until(() => count5() === 2, 10_000, "the unassignment's event");
    // A certificate binding removed (after the one its binding made).
    const m6 = await aMachine();
    const subject6 = `SUBJECT:${m6.machineUser!.id}`;
    const bound = await admin.machines.bindCertificate({
      machineUserId: m6.machineUser!.id,
      identity: { case: "sanUri", value: `spiffe://watch.test/${short()}` },
    });
    // Binding makes an event too (the subject's answer names its binding).
    await w.until(() => w.events.filter((x) => x === subject6).length === 1, 10_000, "the binding's event");
    await admin.machines.unbindCertificate({
      machineUserId: m6.machineUser!.id,
      identity: { case: "bindingId", value: bound.binding!.id },
    });
    // Two rows change: the binding's, and the machine user's cut-off of the tokens it issued.
    await w.until(() => w.events.filter((x) => x === subject6).length >= 2, 10_000, "the unbinding's event");
    w.close();
  });

  it("sends an event when a tenant is disabled (to a `*` caller)", async () => {
    const s = watch(superToken);
    await s.first();
    const { tenant } = await admin.tenants.createTenant({ name: `gone-${short()}` });
    await admin.tenants.updateTenant({ id: tenant!.id, disabled: true });
    const m = await s.event(K.TENANT, tenant!.id);
    expect(m.events.find((e) => e.id === tenant!.id)!.tenantId).toBe(tenant!.id);
    s.close();
  });

  it("sends nothing for a last-used flush", async () => {
    const w = watch(verifierToken);
    await w.first();
    const u = await aUser();
    const m = await aMachine();
    // Used: the PAT on a call, the machine token through a verification.
    await clientFor(UserService, plain, u.pat.token).getCurrentUser({});
    const machineCred = await credentialIdOf(m.token);
    expect(await ts.app.lastUsed.flush()).toBe(true);
    const row = await ts.app.sql.get<{ last_used_at: unknown }>(
      "select last_used_at from api_tokens where id = ?",
      [u.pat.id],
    );
    expect(row?.last_used_at).not.toBeNull();
    // A marker after the flush: whatever the flush made would have come before it.
    const marker = await aUser();
    await marker.tokens.revokePersonalAccessToken({ id: marker.pat.id });
    await w.event(K.CREDENTIAL, marker.pat.id);
    for (const id of [u.pat.id, u.user.id, machineCred, m.machineUser!.id])
      expect(w.events.some((e) => e.endsWith(`:${id}`))).toBe(false);
    w.close();
  });

  it("resumes from a cursor with exactly the events missed, in order, within the tenant", async () => {
    const [a, b, c] = [await aUser(), await aUser(), await aUser()];
    const { tenant: other } = await admin.tenants.createTenant({ name: `other-${short()}` });
    const foreign = await aUser(other!.id);
    const w = watch(verifierToken);
    const s = watch(superToken);
    await w.first();
    await s.first();
    const [cursor, superCursor] = [w.cursor, s.cursor];
    w.close();
    s.close();
    await a.tokens.revokePersonalAccessToken({ id: a.pat.id });
    await foreign.tokens.revokePersonalAccessToken({ id: foreign.pat.id });
    await b.tokens.revokePersonalAccessToken({ id: b.pat.id });
    await c.tokens.revokePersonalAccessToken({ id: c.pat.id });
    const expected = [a, b, c].map((u) => `CREDENTIAL:${u.pat.id}`);
    const resumed = watch(verifierToken, cursor);
    await resumed.first();
    // The first message carries every missed event at once.
    expect(resumed.messages[0]!.reset).toBe(false);
    expect(resumed.events).toEqual(expected);
    const all = watch(superToken, superCursor);
    await all.first();
    expect(all.events).toEqual([expected[0], `CREDENTIAL:${foreign.pat.id}`, expected[1], expected[2]]);
    // Its cursor resumes after them: nothing again.
    const again = watch(verifierToken, resumed.cursor);
    await again.first();
    expect(again.messages[0]!.reset).toBe(false);
    expect(again.events).toEqual([]);
    for (const x of [resumed, all, again]) x.close();
  });

  it("resumes across more events than one message holds", async () => {
    const w = watch(verifierToken);
    await w.first();
    const cursor = w.cursor;
    w.close();
    const ids = Array.from({ length: 1_100 }, () => randomUUID());
    // Straight into the feed, in one statement (1,100 revocations through the API would take minutes here).
    await ts.app.sql.run(
      `insert into revocation_events (kind, subject_id, tenant_id, occurred_at) values ${ids.map(() => "('credential', ?, ?, ?)").join(", ")}`,
      ids.flatMap((id) => [id, tenantId, new Date()]),
    );
    const resumed = watch(verifierToken, cursor);
    await resumed.until(() => resumed.events.length >= ids.length, 20_000, "1,100 events");
    expect(resumed.events).toEqual(ids.map((id) => `CREDENTIAL:${id}`));
    expect(resumed.messages.length).toBeGreaterThanOrEqual(3);
    expect(resumed.messages.every((m) => m.events.length <= 500)).toBe(true);
    resumed.close();
  });

  it("answers reset for a garbled, tampered or foreign cursor, then goes on", async () => {
    const w = watch(verifierToken);
    await w.first();
    const real = w.cursor;
    w.close();
    const mid = Math.floor(real.length / 2);
    const tampered = real.slice(0, mid) + (real[mid] === "A" ? "B" : "A") + real.slice(mid + 1);
    const foreign = new CursorCodec(randomUUID()).seal({
      id: 1,
      kind: "credential",
      subjectId: "x",
      tenantId: "t",
      occurredAt: 0,
    });
    for (const cursor of ["not a cursor", "QUJDRA", tampered, foreign]) {
      const r = watch(verifierToken, cursor);
      await r.first();
      expect(r.messages[0]!.reset, cursor).toBe(true);
      expect(r.messages[0]!.events).toEqual([]);
      expect(new CursorCodec(randomUUID()).open(r.messages[0]!.cursor)).toBeUndefined();
      r.close();
    }
    // After a reset the stream goes on from the new cursor.
    const r = watch(verifierToken, "garbled");
    await r.first();
    const u = await aUser();
    await u.tokens.revokePersonalAccessToken({ id: u.pat.id });
    await r.event(K.CREDENTIAL, u.pat.id);
    r.close();
  });

  it("never shows another tenant's events; a `*` caller sees every tenant's", async () => {
    const { tenant: other } = await admin.tenants.createTenant({ name: `wall-${short()}` });
    const foreign = await aUser(other!.id);
    const mine = await aUser();
    const w = watch(verifierToken);
    const s = watch(superToken);
    await w.first();
    await s.first();
    await foreign.tokens.revokePersonalAccessToken({ id: foreign.pat.id });
    await admin.users.deleteUser({ id: foreign.user.id });
    await admin.tenants.updateTenant({ id: other!.id, disabled: true });
    await mine.tokens.revokePersonalAccessToken({ id: mine.pat.id });
    await w.event(K.CREDENTIAL, mine.pat.id);
    await s.event(K.CREDENTIAL, mine.pat.id);
    expect(w.events).toEqual([`CREDENTIAL:${mine.pat.id}`]);
    expect(s.events).toEqual([
      `CREDENTIAL:${foreign.pat.id}`,
      `SUBJECT:${foreign.user.id}`,
      `TENANT:${other!.id}`,
      `CREDENTIAL:${mine.pat.id}`,
    ]);
    w.close();
    s.close();
  });

  it("sends a heartbeat every heartbeat_seconds, whose cursor resumes", async () => {
    const w = watch(verifierToken);
    await w.first();
    const t0 = w.messages[0]!.at;
    await w.until(() => w.messages.length >= 3, 5_000, "two heartbeats");
    for (const m of w.messages) {
      expect(m.events).toEqual([]);
      expect(m.reset).toBe(false);
      expect(m.heartbeatSeconds).toBe(1);
    }
    // About a second apart (generously: the machine is loaded).
    expect(w.messages[1]!.at - t0).toBeGreaterThan(800);
    w.close();
    const r = watch(verifierToken, w.cursor);
    await r.first();
    expect(r.messages[0]!.reset).toBe(false);
    r.close();
  });

  it("admits machine principals holding auth:verify only (bearer, Basic, bound certificate)", async () => {
    const u = await aUser();
    const noVerify = await aMachine();
    const refusals: [string | Record<string, string>, Code][] = [
      [u.login.accessToken, Code.PermissionDenied],
      [u.pat.token, Code.PermissionDenied],
      [noVerify.token, Code.PermissionDenied],
      [{}, Code.Unauthenticated],
    ];
    for (const [auth, code] of refusals) {
      const w = watch(auth);
      const err = await w.end();
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(code);
      expect(w.messages).toEqual([]);
    }
    const basicVerifier = await admin.machines.createMachineUser({
      tenantId,
      name: `basic-verifier-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["auth:verify"],
    });
    const b = watch(basic(basicVerifier.username, basicVerifier.password));
    await b.first();
    b.close();
    const certVerifier = await admin.machines.createMachineUser({
      tenantId,
      name: `cert-verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    await admin.machines.bindCertificate({
      machineUserId: certVerifier.machineUser!.id,
      identity: { case: "sha256Fingerprint", value: ts.certs.clientFingerprint },
    });
    const c = watch({}, "", ts.connect({ clientCert: true }));
    await c.first();
    c.close();
  });

  it("streams over Connect, gRPC and gRPC-Web", async () => {
    const watchers = [plain, ts.grpc(), ts.grpcWeb()].map((t) => watch(verifierToken, "", t));
    for (const w of watchers) await w.first();
    const u = await aUser();
    await u.tokens.revokePersonalAccessToken({ id: u.pat.id });
    for (const w of watchers) {
      await w.event(K.CREDENTIAL, u.pat.id);
      w.close();
    }
  });

  it("bounds the streams of one caller (ResourceExhausted) and counts them", async () => {
    const caller = (
      await admin.machines.createMachineUser({
        tenantId,
        name: `greedy-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    // Every stream of the tests before is closed (on the server too).
    await expect.poll(() => ts.app.revocations.stats().open, { timeout: 15_000 }).toBe(0);
    const before = ts.app.revocations.stats();
    const six = Array.from({ length: 6 }, () => watch(caller));
    for (const w of six) await w.first();
    expect(ts.app.revocations.stats().open).toBe(before.open + 6);
    const seventh = watch(caller);
    const err = await seventh.end();
    expect((err as ConnectError).code).toBe(Code.ResourceExhausted);
    // Another caller is not affected.
    const other = watch(verifierToken);
    await other.first();
    // One closed: room again (once the server has seen the stream go: on a loaded machine
    // that can take seconds, as the wait for the earlier streams above allows).
    six[0]!.close();
    await expect.poll(() => ts.app.revocations.stats().open, { timeout: 15_000 }).toBe(before.open + 6);
    const again = watch(caller);
    await again.first();
    // Events sent are counted, per stream: the seven open streams each sent this one (each
    // awaited: a stream's message is counted when it is made, which need not be before
    // another stream's arrives).
    const u = await aUser();
    await u.tokens.revokePersonalAccessToken({ id: u.pat.id });
    const streams = [...six.slice(1), again, other];
    for (const w of streams) await w.event(K.CREDENTIAL, u.pat.id);
    expect(ts.app.revocations.stats().sent).toBeGreaterThanOrEqual(before.sent + streams.length);
    for (const w of [...six, again, other]) w.close();
  });

  // Last: retention moves the pruned mark, which resets every older cursor of this database.
  it("answers reset for a cursor whose events were pruned, and resumes one that was not", async () => {
    const w = watch(verifierToken);
    await w.first();
    const old = w.cursor;
    const u = await aUser();
    const v = await aUser();
    await u.tokens.revokePersonalAccessToken({ id: u.pat.id });
    await w.event(K.CREDENTIAL, u.pat.id);
    const recent = w.cursor;
    await v.tokens.revokePersonalAccessToken({ id: v.pat.id });
    await w.event(K.CREDENTIAL, v.pat.id);
    w.close();
    // Retention: everything older than a second from now, the newest kept.
    const pruned = await new RevocationEventRepository(ts.app.sql).prune(
      new Date(Date.now() + 1_000),
      1_000_000,
    );
    expect(pruned).toBeGreaterThan(0);
    const r = watch(verifierToken, old);
    await r.first();
    expect(r.messages[0]!.reset).toBe(true);
    const fresh = watch(verifierToken, recent);
    await fresh.first();
    expect(fresh.messages[0]!.reset).toBe(false);
    expect(fresh.events).toEqual([`CREDENTIAL:${v.pat.id}`]);
    r.close();
    fresh.close();
  });
});

describe.each(DATABASES)("WatchRevocations woken by the change itself on $name", (db) => {
  it("delivers a revocation at once, not at the next poll (a minute here)", async () => {
    // On SQLite the state tables' triggers wake the feed's reader; on PostgreSQL the NOTIFY.
    const ts = await startTestServer(db, { verification: { watchPollMs: 60_000 } });
    try {
      const plain = ts.connect();
      const admin = clients(plain, await adminLogin(plain));
      const verifier = (
        await admin.machines.createMachineUser({
          name: `verifier-${short()}`,
          authType: MachineAuthType.BEARER,
          scopes: ["*"],
        })
      ).token;
      const w = Watcher.open(plain, verifier);
      await w.first();
      const username = `u-${short()}`;
      await admin.users.createUser({ username, password: "user password long", scopes: [] });
      const login = await createClient(UserService, plain).login({
        username,
        password: "user password long",
      });
      const tokens = clientFor(TokenService, plain, login.accessToken);
      for (let i = 0; i < 3; i++) {
        const pat = await tokens.createPersonalAccessToken({ name: `p${i}` });
        const revoked = performance.now();
        await tokens.revokePersonalAccessToken({ id: pat.id });
        // Well under the poll: 5 s leaves room for a loaded machine.
        await w.event(K.CREDENTIAL, pat.id, 5_000);
        expect(performance.now() - revoked).toBeLessThan(5_000);
      }
      w.close();
    } finally {
      await ts.close();
    }
  });
});

describe("WatchRevocations at shutdown", () => {
  it("ends every stream cleanly when the server drains, and refuses new ones", async () => {
    const ts = await startTestServer(SQLITE);
    try {
      const root = await adminLogin(ts.connect());
      const token = (
        await clients(ts.connect(), root).machines.createMachineUser({
          name: `verifier-${short()}`,
          authType: MachineAuthType.BEARER,
          scopes: ["auth:verify"],
        })
      ).token;
      const w = Watcher.open(ts.connect(), token);
      await w.first();
      const { cut } = await ts.server.close(10_000);
      expect(await w.end()).toBeNull();
      expect(cut).toBe(0);
      expect(ts.app.revocations.stats().open).toBe(0);
    } finally {
      await ts.app.close();
    }
  });
});
