import type { ChildProcess } from "node:child_process";
import { setTimeout as sleep } from "node:timers/promises";
import { createClient, type Transport } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { createApp } from "../../src/app.js";
import { startServer } from "../../src/server.js";
import { initORM, type Storage } from "../../src/storage/orm.js";
import { outcome } from "../errors-util.js";
import {
  clientFor,
  createTestCerts,
  POSTGRES,
  silentLogger,
  startTestServer,
  type TestCerts,
  type TestDatabase,
  type TestServer,
  testConfig,
} from "../helpers.js";
import {
  adminLogin,
  basic,
  basicMachine,
  bearerMachine,
  clients,
  short,
  tenantWithAdmin,
} from "../machine-fixtures.js";
import { transportTo } from "./fixtures.js";
import { serve, serveEnv } from "./processes.js";

/**
 * The PostgreSQL state cache across instances: A runs in this process (its cache counters
 * and listening session are at hand), B is a `tessera serve` process on the same schema.
 * Every state change made on one instance is refused or applied by the other on the very
 * next request, with A's cache warmed first (a missed invalidation would show up as a
 * stale accept), and losing A's listening session never leaves a revoked credential
 * accepted.
 */

const PASSWORD = "multi instance password";

const url = POSTGRES.url();
const db: TestDatabase = { name: "postgres", url: () => url };
let certs: TestCerts;
let a: TestServer;
let b: { child: ChildProcess; url: string };
let probe: Storage;
let ta: Transport;
let tb: Transport;
let adminA: string;

/** Call twice on A and check both were answered from its cache (so a stale entry would be served). */
async function warmOnA(call: () => Promise<unknown>): Promise<void> {
  await call();
  const before = a.app.sql.cacheStats();
  await call();
  const after = a.app.sql.cacheStats();
  expect(after.enabled).toBe(true);
  expect(after.hits).toBeGreaterThan(before.hits);
  expect(after.misses).toBe(before.misses);
}

/** A user of the default tenant with a session (JWT + refresh token), a PAT and an API key, made on `t`. */
async function userOn(t: Transport, scopes = ["cluster:read", "cluster:write"]) {
  const username = `mi-${short()}`;
  const { user } = await clients(t, adminA).users.createUser({ username, password: PASSWORD, scopes });
  const login = await createClient(UserService, t).login({ username, password: PASSWORD });
  const tokens = clientFor(TokenService, t, login.accessToken);
  const pat = await tokens.createPersonalAccessToken({ name: "mi" });
  const key = await tokens.createApiKey({ name: "mi" });
  return { id: user!.id, username, login, pat, key };
}

const me = (t: Transport, token: string) => clientFor(UserService, t, token).getCurrentUser({});

beforeAll(async () => {
  certs = await createTestCerts();
  a = await startTestServer(db, {}, certs);
  b = await serve(serveEnv(url, certs.dir));
  ta = a.connect();
  tb = transportTo(b.url, certs);
  adminA = await adminLogin(ta);
  probe = await initORM({ url, migrate: false });
});

afterAll(async () => {
  if (b?.child.exitCode === null) {
    b.child.kill("SIGCONT");
    const exited = new Promise((r) => b.child.once("exit", r));
    b.child.kill("SIGTERM");
    await exited;
  }
  await probe?.close();
  await a?.close();
});

describe("state changes made on one PostgreSQL instance, on the next request of the other", () => {
  it("revoking a personal access token or an API key on B is refused on A", async () => {
    const u = await userOn(ta);
    await warmOnA(() => me(ta, u.pat.token));
    await warmOnA(() => me(ta, u.key.key));
    const tokensB = clientFor(TokenService, tb, u.login.accessToken);
    await tokensB.revokePersonalAccessToken({ id: u.pat.id });
    expect(await outcome(me(ta, u.pat.token))).toBe("TOKEN_REVOKED");
    await tokensB.revokeApiKey({ id: u.key.id });
    expect(await outcome(me(ta, u.key.key))).toBe("TOKEN_REVOKED");
    expect(await outcome(me(ta, u.login.accessToken))).toBe("ok");
  });

  it("disabling, re-enabling, narrowing and deleting a user on B apply on A", async () => {
    const u = await userOn(ta);
    const adminB = clients(tb, adminA).users;
    await warmOnA(() => me(ta, u.pat.token));
    await warmOnA(() => me(ta, u.login.accessToken));
    await adminB.updateUser({ id: u.id, disabled: true });
    expect(await outcome(me(ta, u.pat.token))).toBe("PRINCIPAL_DISABLED");
    expect(await outcome(me(ta, u.login.accessToken))).toBe("PRINCIPAL_DISABLED");
    await adminB.updateUser({ id: u.id, disabled: false });
    expect(await outcome(me(ta, u.pat.token))).toBe("ok");
    // The session the disable ended stays ended.
    expect(await outcome(me(ta, u.login.accessToken))).toBe("TOKEN_REVOKED");
    await warmOnA(() => me(ta, u.pat.token));
    await adminB.updateUser({ id: u.id, scopes: { scopes: ["cluster:read"] } });
    expect((await me(ta, u.pat.token)).permissions).toEqual(["cluster:read"]);
    await warmOnA(() => me(ta, u.pat.token));
    await adminB.deleteUser({ id: u.id });
    // Its tokens went with it: unknown now (TOKEN_INVALID), refused either way.
    expect(["TOKEN_REVOKED", "TOKEN_INVALID"]).toContain(await outcome(me(ta, u.pat.token)));
  });

  it("a logout on B, and a refresh-token reuse on B, end the session's access tokens on A", async () => {
    const u = await userOn(ta);
    await warmOnA(() => me(ta, u.login.accessToken));
    await createClient(UserService, tb).logout({ refreshToken: u.login.refreshToken });
    expect(await outcome(me(ta, u.login.accessToken))).toBe("TOKEN_REVOKED");

    const again = await createClient(UserService, ta).login({ username: u.username, password: PASSWORD });
    await warmOnA(() => me(ta, again.accessToken));
    const onB = createClient(UserService, tb);
    const next = await onB.refreshToken({ refreshToken: again.refreshToken });
    await warmOnA(() => me(ta, next.accessToken));
    // The spent refresh token presented again: the whole family ends, on every instance.
    expect(await outcome(onB.refreshToken({ refreshToken: again.refreshToken }))).not.toBe("ok");
    expect(await outcome(me(ta, next.accessToken))).toBe("TOKEN_REVOKED");
    expect(await outcome(me(ta, again.accessToken))).toBe("TOKEN_REVOKED");

    // A password change on B ends every session of the user, and (asked to) its tokens, on A.
    const third = await createClient(UserService, ta).login({ username: u.username, password: PASSWORD });
    await warmOnA(() => me(ta, third.accessToken));
    await warmOnA(() => me(ta, u.pat.token));
    await clientFor(UserService, tb, third.accessToken).changePassword({
      currentPassword: PASSWORD,
      newPassword: `${PASSWORD} changed`,
      revokeTokens: true,
    });
    expect(await outcome(me(ta, third.accessToken))).toBe("TOKEN_REVOKED");
    expect(await outcome(me(ta, u.pat.token))).toBe("TOKEN_REVOKED");
    expect(await outcome(me(ta, u.key.key))).toBe("TOKEN_REVOKED");
  });

  it("disabling a tenant, and disabling, rotating and deleting a machine user on B apply on A", async () => {
    const t = await tenantWithAdmin(ta, adminA);
    const m = await bearerMachine(ta, t.token, [t.application.id]);
    const machineA = () => clients(ta, m.token).machines.checkAuthentication({});
    const tenantAdminA = () => me(ta, t.token);
    await warmOnA(machineA);
    await warmOnA(tenantAdminA);
    const rootB = clients(tb, adminA);
    await rootB.tenants.updateTenant({ id: t.tenant.id, disabled: true });
    expect(await outcome(machineA())).toBe("PRINCIPAL_DISABLED");
    expect(await outcome(tenantAdminA())).toBe("PRINCIPAL_DISABLED");
    await rootB.tenants.updateTenant({ id: t.tenant.id, disabled: false });
    expect(await outcome(machineA())).toBe("ok");

    await warmOnA(machineA);
    const machinesB = clients(tb, t.token).machines;
    await machinesB.updateMachineUser({ id: m.machine.id, disabled: true });
    expect(await outcome(machineA())).toBe("PRINCIPAL_DISABLED");
    await machinesB.updateMachineUser({ id: m.machine.id, disabled: false });
    await warmOnA(machineA);
    // A rotation without grace: the machine credential (the token) stops at once.
    const rotated = await machinesB.rotateMachineUserCredentials({ id: m.machine.id });
    expect(await outcome(machineA())).not.toBe("ok");
    const machineNew = () => clients(ta, rotated.token).machines.checkAuthentication({});
    await warmOnA(machineNew);
    await machinesB.deleteMachineUser({ id: m.machine.id });
    expect(await outcome(machineNew())).not.toBe("ok");
  });

  it("unbinding a client certificate, rotating a Basic secret and revoking machine access tokens (RFC 7009) on B apply on A", async () => {
    const t = await tenantWithAdmin(ta, adminA);
    // mTLS: the test client certificate bound (on A) to a bearer machine user.
    const m = await bearerMachine(ta, t.token, [t.application.id]);
    const machinesB = clients(tb, t.token).machines;
    await clients(ta, t.token).machines.bindCertificate({
      machineUserId: m.machine.id,
      identity: { case: "sha256Fingerprint", value: certs.clientFingerprint },
    });
    const byCertificate = () => clients(a.connect({ clientCert: true })).machines.checkAuthentication({});
    await warmOnA(byCertificate);
    expect((await byCertificate()).machineUserId).toBe(m.machine.id);
    await machinesB.unbindCertificate({
      machineUserId: m.machine.id,
      identity: { case: "sha256Fingerprint", value: certs.clientFingerprint },
    });
    expect(await outcome(byCertificate())).not.toBe("ok");

    // A Basic machine user's secret, rotated on B without grace: the old one stops on A.
    const bm = await basicMachine(ta, t.token, [t.application.id]);
    const byBasic = (username: string, password: string) =>
      clients(ta, basic(username, password)).machines.checkAuthentication({});
    await warmOnA(() => byBasic(bm.username, bm.password));
    const rotated = await machinesB.rotateMachineUserCredentials({ id: bm.machine.id });
    expect(rotated.password).not.toBe("");
    expect(await outcome(byBasic(bm.username, bm.password))).not.toBe("ok");
    await warmOnA(() => byBasic(rotated.username, rotated.password));

    // A machine access token (JWT) issued on A, revoked through B's /oauth2/revoke by its holder.
    const issued = await clients(ta, m.token).machines.issueAccessToken({});
    const byAccessToken = () => clients(ta, issued.accessToken).machines.checkAuthentication({});
    await warmOnA(byAccessToken);
    const dispatcher = new Agent({ connect: { ca: certs.ca } });
    try {
      const res = await request(`${b.url}/oauth2/revoke`, {
        method: "POST",
        dispatcher,
        headers: {
          "content-type": "application/x-www-form-urlencoded",
          authorization: `Bearer ${issued.accessToken}`,
        },
        body: new URLSearchParams({ token: issued.accessToken, token_type_hint: "access_token" }).toString(),
      });
      await res.body.text();
      expect(res.statusCode).toBe(200);
    } finally {
      await dispatcher.close();
    }
    expect(await outcome(byAccessToken())).toBe("TOKEN_REVOKED");
    // Its long-lived credential stays.
    expect(await outcome(clients(ta, m.token).machines.checkAuthentication({}))).toBe("ok");
  });

  it("a revocation made on A is refused on B", async () => {
    const u = await userOn(tb);
    expect(await outcome(me(tb, u.pat.token))).toBe("ok");
    expect(await outcome(me(tb, u.pat.token))).toBe("ok");
    await clientFor(TokenService, ta, u.login.accessToken).revokePersonalAccessToken({ id: u.pat.id });
    expect(await outcome(me(tb, u.pat.token))).toBe("TOKEN_REVOKED");
  });
});

/** The backend pid of A's listening session, waiting for it to be online. */
async function listenerPidOfA(): Promise<number> {
  expect(await a.app.notifier!.whenOnline(20_000)).toBe(true);
  return a.app.notifier!.backendPid!;
}

describe("the listening session of an instance lost", () => {
  it("never accepts a credential revoked on B while A's listening session is terminated", async () => {
    for (let round = 0; round < 5; round++) {
      const u = await userOn(ta);
      await warmOnA(() => me(ta, u.pat.token));
      const pid = await listenerPidOfA();
      const revoked = { done: false };
      const stale: string[] = [];
      // A steady stream of requests on A throughout.
      const loop = (async () => {
        while (!revoked.done || stale.length === 0) {
          const started = revoked.done;
          const o = await outcome(me(ta, u.pat.token));
          if (started && o === "ok") stale.push(o);
          if (started) break;
        }
      })();
      // The termination and the revocation race each other (order varies by round).
      const kill = probe.em.getConnection().execute("select pg_terminate_backend(?)", [pid]);
      if (round % 2 === 0) await kill;
      await clientFor(TokenService, tb, u.login.accessToken).revokePersonalAccessToken({ id: u.pat.id });
      revoked.done = true;
      await kill;
      await loop;
      expect(stale).toEqual([]);
      expect(await outcome(me(ta, u.pat.token))).toBe("TOKEN_REVOKED");
      // Back online, emptied, and the refusal still holds from the cache's side.
      expect(await a.app.notifier!.whenOnline(20_000)).toBe(true);
      expect(a.app.notifier!.backendPid).not.toBe(pid);
      expect(await outcome(me(ta, u.pat.token))).toBe("TOKEN_REVOKED");
    }
  });

  it("turns the cache off at once when the session is terminated, and on again, emptied, once it listens", async () => {
    const u = await userOn(ta);
    await warmOnA(() => me(ta, u.pat.token));
    const pid = await listenerPidOfA();
    const offline = new Promise<void>((resolve) => {
      const off = a.app.notifier!.onStatus((online) => {
        if (!online) {
          off();
          resolve();
        }
      });
    });
    await probe.em.getConnection().execute("select pg_terminate_backend(?)", [pid]);
    await offline;
    expect(a.app.sql.cacheStats().enabled).toBe(false);
    // While off, every read goes to the database: a change nobody announced to A is seen.
    const hits = a.app.sql.cacheStats().hits;
    expect(await outcome(me(ta, u.pat.token))).toBe("ok");
    expect(a.app.sql.cacheStats().hits).toBe(hits);
    expect(await a.app.notifier!.whenOnline(20_000)).toBe(true);
    // Online is not yet on: the triggers are checked again first (an asynchronous query).
    await vi.waitFor(() => expect(a.app.sql.cacheStats().enabled).toBe(true), {
      timeout: 20_000,
      interval: 20,
    });
    await warmOnA(() => me(ta, u.pat.token));
  });

  it("ends the listening session of an instance that does not acknowledge a change (B frozen)", async () => {
    const u = await userOn(ta);
    expect(await outcome(me(tb, u.pat.token))).toBe("ok");
    expect(await outcome(me(tb, u.pat.token))).toBe("ok");
    const listeners = async () =>
      Number(
        (
          (await probe.em
            .getConnection()
            .execute(
              "select count(*) as n from pg_stat_activity where application_name = ? and datname = current_database()",
              [a.app.notifier!.applicationName],
            )) as { n: string }[]
        )[0]!.n,
      );
    expect(await listeners()).toBe(2);
    b.child.kill("SIGSTOP");
    try {
      const started = performance.now();
      await clientFor(TokenService, ta, u.login.accessToken).revokePersonalAccessToken({ id: u.pat.id });
      // A waited for B's acknowledgement up to the bound, then ended B's listening session.
      expect(performance.now() - started).toBeGreaterThan(500);
      expect(await listeners()).toBe(1);
    } finally {
      b.child.kill("SIGCONT");
    }
    expect(await outcome(me(tb, u.pat.token))).toBe("TOKEN_REVOKED");
  });
});

describe("queries per authenticated call at steady state", () => {
  /** Index and sequential scans of the schema's tables so far, per table, as PostgreSQL's statistics count them. */
  async function scans(): Promise<Record<string, number>> {
    const schema = /[?&]schema=([a-z0-9_]+)/.exec(url)![1]!;
    const rows = (await probe.em
      .getConnection()
      .execute(
        "select relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0) as n from pg_stat_user_tables where schemaname = ?",
        [schema],
      )) as { relname: string; n: string }[];
    return Object.fromEntries(rows.map((r) => [r.relname, Number(r.n)]));
  }
  // signing_keys is left out: every instance re-reads it every auth.jwt.keyRefreshMs (500 ms)
  // to learn other instances' keys (jwt.ts), a poll per interval and per instance, not per call.
  // The revocation feed's tables count: while an instance listens, its feed reads them only
  // when notified (and prunes them once a minute), never on a timer.
  const total = (s: Record<string, number>) =>
    Object.entries(s).reduce((x, [table, n]) => (table === "signing_keys" ? x : x + n), 0);
  const delta = (x: Record<string, number>, y: Record<string, number>) =>
    Object.fromEntries(Object.entries(y).flatMap(([k, v]) => (v !== x[k] ? [[k, v - (x[k] ?? 0)]] : [])));
  /** Backends report their statistics at most once a second, and an idle one within 10 s. */
  const flushed = () => sleep(11_500);

  it("sends no query for JWT- and PAT-authenticated calls answered from the cache (and one each without it)", async () => {
    const u = await userOn(ta);
    await warmOnA(() => me(ta, u.pat.token));
    await warmOnA(() => me(ta, u.login.accessToken));
    // The same calls on an instance without a state cache, to show that the count counts.
    const appC = await createApp(
      testConfig(url, { database: { url, stateCacheSize: 0 }, server: { certDir: certs.dir } }),
      { logger: silentLogger },
    );
    const serverC = await startServer(appC);
    const tc = transportTo(serverC.url, certs);
    try {
      await me(tc, u.pat.token);
      await flushed();
      const s0 = await scans();
      const t0 = performance.now();
      for (let i = 0; i < 200; i++) {
        await me(ta, u.login.accessToken);
        await me(ta, u.pat.token);
      }
      await flushed();
      const s1 = await scans();
      const windowS = (performance.now() - t0) / 1000;
      for (let i = 0; i < 200; i++) {
        await me(tc, u.login.accessToken);
        await me(tc, u.pat.token);
      }
      await flushed();
      const s2 = await scans();
      // 400 calls answered from memory. What remains is per flush interval, not per call: the
      // PAT's coalesced last-used update (an indexed look-up of api_tokens), and B's own
      // background writes after the earlier tests (its last-used flush): at most 1 in 20 calls,
      // against 3 scans per call without the cache. Intervals, not calls: where a loaded
      // machine stretches the 400 calls over minutes, more of them pass, and each may add its
      // scans (the 15 s last-used flush on A and B, the revocation feed's prune each minute on
      // A, B and C); the 20 holds for the half minute the window takes on a quiet machine.
      const byTime = 10 + 2 * Math.ceil(windowS / 15) + 3 * Math.ceil(windowS / 60);
      expect(
        total(s1) - total(s0),
        `${JSON.stringify(delta(s0, s1))} in ${windowS.toFixed(0)} s`,
      ).toBeLessThanOrEqual(Math.max(20, byTime));
      // Without the cache: at least one look-up per call (the state join scans several tables).
      expect(total(s2) - total(s1), JSON.stringify(delta(s1, s2))).toBeGreaterThanOrEqual(400);
    } finally {
      await serverC.close(0);
      await appC.close();
    }
    // 800 calls one at a time and three 11.5 s waits for the statistics: 82 s at load 20,
    // past the multi project's 240 s at load 34. Sequential on purpose (a count per call).
  }, 600_000);
});
