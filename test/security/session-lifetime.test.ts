import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, createClient, type Transport } from "@connectrpc/connect";
import { decodeJwt } from "jose";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { hashRefreshToken, SessionIssuer } from "../../src/services/user/sessions.js";
import { RefreshToken, Session, User } from "../../src/storage/entities.js";
import { rejection } from "../errors-util.js";
import {
  clientFor,
  DATABASES,
  pinnableClock,
  sharedInstances,
  startTestServer,
  type TestDatabase,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { adminLogin, short, verificationCodes, verifierMachine } from "../machine-fixtures.js";

/**
 * A session has an absolute lifetime (auth.sessionMaxLifetime) from its login: refreshed as
 * often as it likes, a session (and a stolen refresh token kept warm) ended only when a
 * refresh lapsed. Past its end a refresh is refused as an expired refresh token is
 * (TOKEN_EXPIRED, the token unspent, no theft), and no token it issued outlives that end.
 */

const PASSWORD = "session lifetime test password";
const MAX = 3600;
const S = 1000;
const config = { auth: { sessionMaxLifetime: MAX, jwt: { accessTokenTtl: 600, refreshTokenTtl: 1800 } } };

const reasonOf = async (call: Promise<unknown>) => {
  const r = await rejection(call);
  expect(r.code).toBe(Code.Unauthenticated);
  return r.reason;
};

async function loginAt(ts: TestServer, root: string) {
  const username = `sl-${short()}`;
  const { user } = await clientFor(UserService, ts.connect(), root).createUser({
    username,
    password: PASSWORD,
  });
  const pair = await createClient(UserService, ts.connect()).login({ username, password: PASSWORD });
  return { ...pair, userId: user!.id, sid: decodeJwt(pair.accessToken).sid as string };
}

const refreshOn = (transport: Transport, refreshToken: string) =>
  createClient(UserService, transport).refreshToken({ refreshToken });
/** Now, up to the next whole second (never before the signing key): access tokens' exp is whole seconds, so expires_in is then exact. */
const wholeSecond = () => Math.ceil(Date.now() / S) * S;
const at = (t: Timestamp | undefined) => timestampDate(t!).getTime();

describe.each(DATABASES)("a session's absolute lifetime ($name)", (db) => {
  let ts: TestServer;
  let root: string;
  let agent: Agent;
  const clock = pinnableClock();

  beforeAll(async () => {
    ts = await startTestServer(db, config, undefined, { clock: clock.now });
    root = await adminLogin(ts.connect());
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    clock.release();
    await agent?.close();
    await ts?.close();
  });

  const current = (token: string) => clientFor(UserService, ts.connect(), token).getCurrentUser({});

  it("ends a session refreshed within every refresh token's lifetime at its end: TOKEN_EXPIRED, unspent, audited as the session's end", async () => {
    const t0 = wholeSecond();
    clock.pin(t0);
    const login = await loginAt(ts, root);
    const end = t0 + MAX * S;
    expect(at(login.refreshTokenExpiresAt)).toBe(t0 + 1800 * S);
    clock.pin(t0 + 1500 * S);
    const first = await refreshOn(ts.grpc(), login.refreshToken);
    clock.pin(t0 + 3200 * S);
    const second = await refreshOn(ts.grpc(), first.refreshToken);
    // Neither token of the last pair outlives the session (uncapped: t0+5000 s and t0+3800 s).
    expect(at(second.refreshTokenExpiresAt)).toBe(end);
    expect(at(second.accessTokenExpiresAt)).toBeLessThanOrEqual(end);
    expect(at(second.accessTokenExpiresAt)).toBeGreaterThan(end - S);
    clock.pin(end - 2 * S);
    expect((await current(second.accessToken)).username).toMatch(/^sl-/);

    clock.pin(end);
    const requestId = `sl-${short()}`;
    const traced = withHeaders(ts.grpc(), { "x-request-id": requestId });
    // Each time: the token is not spent by its refusal, so its retry is no re-use.
    expect(await reasonOf(refreshOn(traced, second.refreshToken))).toBe("TOKEN_EXPIRED");
    expect(await reasonOf(refreshOn(ts.grpc(), second.refreshToken))).toBe("TOKEN_EXPIRED");
    expect(await reasonOf(current(second.accessToken))).toBe("TOKEN_EXPIRED");
    const em = ts.app.storage.em.fork();
    const row = await em.findOneOrFail(RefreshToken, { tokenHash: hashRefreshToken(second.refreshToken) });
    expect(row.spentAt ?? null).toBeNull();
    expect(row.revokedAt ?? null).toBeNull();
    expect((await em.findOneOrFail(Session, { id: login.sid })).revokedAt ?? null).toBeNull();
    await ts.app.audit.flush();
    const records = await ts.app.sql.all<Record<string, unknown>>(
      "select outcome, reason, target_id from audit_events where request_id = ?",
      [requestId],
    );
    expect(records).toEqual([{ outcome: "failure", reason: "TOKEN_EXPIRED", target_id: login.userId }]);
  });

  it("bounds a session opened before the bound from its login (its row's created_at), and one without a row from its first refresh token", async () => {
    const t0 = wholeSecond();
    clock.pin(t0);
    const em = ts.app.storage.em.fork();
    // Opened MAX seconds ago: its refresh token, issued under no bound, is still live.
    const old = await loginAt(ts, root);
    await em.nativeUpdate(Session, { id: old.sid }, { createdAt: new Date(t0 - MAX * S) });
    expect(await reasonOf(refreshOn(ts.grpc(), old.refreshToken))).toBe("TOKEN_EXPIRED");

    // A family from an instance before sessions: no row; its first refresh token is its login.
    const legacy = await loginAt(ts, root);
    await em.nativeDelete(Session, { id: legacy.sid });
    await em.nativeUpdate(RefreshToken, { familyId: legacy.sid }, { createdAt: new Date(t0 - MAX * S) });
    expect(await reasonOf(refreshOn(ts.grpc(), legacy.refreshToken))).toBe("TOKEN_EXPIRED");

    const recent = await loginAt(ts, root);
    await em.nativeDelete(Session, { id: recent.sid });
    await em.nativeUpdate(RefreshToken, { familyId: recent.sid }, { createdAt: new Date(t0 - 2000 * S) });
    const renewed = await refreshOn(ts.grpc(), recent.refreshToken);
    expect(at(renewed.refreshTokenExpiresAt)).toBe(t0 + (MAX - 2000) * S);
    const row = await ts.app.storage.em.fork().findOneOrFail(Session, { id: recent.sid });
    expect(row.createdAt.getTime()).toBe(t0 - 2000 * S);
  });

  it("leaves the token unspent when the session's end comes between the check and the new pair", async () => {
    clock.release();
    const login = await loginAt(ts, root);
    const em = ts.app.storage.em.fork();
    // Whole seconds, as a JWT's exp: the end is the last whole second within the lifetime.
    const started = (await em.findOneOrFail(Session, { id: login.sid })).createdAt.getTime();
    const end = Math.floor((started + 1000 * S) / S) * S;
    // Before the refresh token's expiry (1800 s): rotate() reads the time once before spending (just before the end), issue() after (at it).
    let reads = 0;
    const issuer = new SessionIssuer(ts.app.jwt, 1800, () => (reads++ === 0 ? end - 1 : end), 1000);
    await expect(issuer.rotate(em, login.refreshToken)).rejects.toMatchObject({ reason: "TOKEN_EXPIRED" });
    expect(reads).toBeGreaterThan(1);
    const row = await ts.app.storage.em
      .fork()
      .findOneOrFail(RefreshToken, { tokenHash: hashRefreshToken(login.refreshToken) });
    expect(row.spentAt ?? null).toBeNull();
  });

  async function grant(refreshToken: string) {
    const res = await request(`${ts.server.url}/oauth2/token`, {
      method: "POST",
      dispatcher: agent,
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ grant_type: "refresh_token", refresh_token: refreshToken }).toString(),
    });
    return { status: res.statusCode, json: (await res.body.json()) as Record<string, unknown> };
  }

  it("caps the OAuth refresh grant's expires_in at the session's end, then answers invalid_grant", async () => {
    const t0 = wholeSecond();
    clock.pin(t0);
    const login = await loginAt(ts, root);
    clock.pin(t0 + 1700 * S);
    const renewed = await grant(login.refreshToken);
    expect(renewed.json.expires_in).toBe(600);
    clock.pin(t0 + 3300 * S);
    const near = await grant(renewed.json.refresh_token as string);
    expect(near.status).toBe(200);
    expect(near.json.expires_in).toBe(300);
    clock.pin(t0 + MAX * S);
    const over = await grant(near.json.refresh_token as string);
    expect(over).toEqual({ status: 400, json: expect.objectContaining({ error: "invalid_grant" }) });
    // Unspent: the same token is refused the same way, no theft.
    expect((await grant(near.json.refresh_token as string)).json.error).toBe("invalid_grant");
    const em = ts.app.storage.em.fork();
    expect((await em.findOneOrFail(Session, { id: login.sid })).revokedAt ?? null).toBeNull();
  });
  it("ends a session begun in a second's fraction at that second: no pair dead on arrival, no 500 that spends the token", async () => {
    // A login at .700 of a second: the end's last 700 ms are past the whole second a JWT's exp can name.
    const t0 = wholeSecond() + 700;
    clock.pin(t0);
    const viaGrant = await loginAt(ts, root);
    const viaRpc = await loginAt(ts, root);
    const warm = async (refreshToken: string) => {
      clock.pin(t0 + 1700 * S);
      const first = await refreshOn(ts.grpc(), refreshToken);
      clock.pin(t0 + 3400 * S);
      return (await refreshOn(ts.grpc(), first.refreshToken)).refreshToken;
    };
    const grantToken = await warm(viaGrant.refreshToken);
    const rpcToken = await warm(viaRpc.refreshToken);
    // Every token of the session ends at the whole second.
    const em = ts.app.storage.em.fork();
    const row = await em.findOneOrFail(RefreshToken, { tokenHash: hashRefreshToken(grantToken) });
    expect(row.expiresAt.getTime()).toBe(t0 - 700 + MAX * S);
    clock.pin(t0 + MAX * S - 200);
    expect(await grant(grantToken)).toEqual({
      status: 400,
      json: expect.objectContaining({ error: "invalid_grant" }),
    });
    expect(await reasonOf(refreshOn(ts.grpc(), rpcToken))).toBe("TOKEN_EXPIRED");
    // Unspent both ways: the retry is no re-use, and the sessions stand.
    expect((await grant(grantToken)).json.error).toBe("invalid_grant");
    expect(await reasonOf(refreshOn(ts.grpc(), rpcToken))).toBe("TOKEN_EXPIRED");
    const fresh = ts.app.storage.em.fork();
    for (const sid of [viaGrant.sid, viaRpc.sid])
      expect((await fresh.findOneOrFail(Session, { id: sid })).revokedAt ?? null).toBeNull();
  });

  it("refuses a refresh whose session a logout ended after rotate's first reads: TOKEN_REVOKED, not a pair of an ended session", async () => {
    clock.release();
    const login = await loginAt(ts, root);
    const issuer = new SessionIssuer(ts.app.jwt, 1800, Date.now, MAX);
    const em = ts.app.storage.em.fork();
    // The logout's write lands when rotate() reads the user, after it read the session (its end).
    const findOne = em.findOne.bind(em);
    let ended = false;
    (em as unknown as { findOne: unknown }).findOne = async (entity: unknown, ...rest: unknown[]) => {
      if (entity === User && !ended) {
        ended = true;
        await ts.app.storage.em.fork().nativeUpdate(Session, { id: login.sid }, { revokedAt: new Date() });
      }
      return (findOne as (...args: unknown[]) => unknown)(entity, ...rest);
    };
    await expect(issuer.rotate(em, login.refreshToken)).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
    expect(ended).toBe(true);
    const row = await ts.app.storage.em
      .fork()
      .findOneOrFail(RefreshToken, { tokenHash: hashRefreshToken(login.refreshToken) });
    expect(row.spentAt ?? null).toBeNull();
  });
});

describe.each(DATABASES)("a session's absolute lifetime on two instances ($name)", (db: TestDatabase) => {
  let dir: string;
  let a: TestServer;
  let b: TestServer;
  let root: string;
  const clock = pinnableClock();

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tessera-session-lifetime-"));
    const url = db.name === "sqlite" ? `sqlite:${join(dir, "tessera.db")}` : db.url();
    const shared: TestDatabase = { ...db, url: () => url };
    a = await startTestServer(shared, config, undefined, { clock: clock.now });
    b = await startTestServer(shared, config, undefined, { clock: clock.now });
    root = await adminLogin(a.connect());
  });
  afterAll(async () => {
    clock.release();
    await b?.close();
    await a?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("ends a session opened on one instance at its end on the other", async () => {
    const t0 = wholeSecond();
    clock.pin(t0);
    const login = await loginAt(a, root);
    clock.pin(t0 + 1700 * S);
    const onB = await refreshOn(b.grpc(), login.refreshToken);
    expect(at(onB.refreshTokenExpiresAt)).toBe(t0 + 3500 * S);
    clock.pin(t0 + 3400 * S);
    const onA = await refreshOn(a.grpc(), onB.refreshToken);
    expect(at(onA.refreshTokenExpiresAt)).toBe(t0 + MAX * S);
    clock.pin(t0 + MAX * S);
    expect(await reasonOf(refreshOn(b.grpc(), onA.refreshToken))).toBe("TOKEN_EXPIRED");
    expect(await reasonOf(refreshOn(a.grpc(), onA.refreshToken))).toBe("TOKEN_EXPIRED");
  });
});

describe.each(DATABASES)(
  "a session's end on every call, for tokens an instance not bounding it issued ($name)",
  (db) => {
    const clock = pinnableClock();
    // On one database: an instance with no bound (as one from before it, in a rolling upgrade)
    // and one bounding sessions at MAX.
    const [unbounded, bounded] = ((servers) => [() => servers[0]!, () => servers[1]!])(
      sharedInstances(
        db.name === "sqlite" ? "sqlite" : "postgres",
        [{ auth: { ...config.auth, sessionMaxLifetime: 0 } }, config],
        { clock: clock.now },
      ),
    );
    let root: string;
    let verifier: string;
    let agent: Agent;

    beforeAll(async () => {
      root = await adminLogin(bounded().connect());
      verifier = await verifierMachine(bounded().connect(), root);
      agent = new Agent({ connect: { ca: bounded().certs.ca } });
    });
    afterAll(async () => {
      clock.release();
      await agent?.close();
    });

    const current = (ts: TestServer, token: string) =>
      clientFor(UserService, ts.connect(), token).getCurrentUser({});
    const verify = (token: string) =>
      createClient(
        VerificationService,
        withHeaders(bounded().connect(), { authorization: `Bearer ${verifier}` }),
      ).verifyCredential({ credential: token });
    async function introspect(token: string) {
      const res = await request(`${bounded().server.url}/oauth2/introspect`, {
        method: "POST",
        dispatcher: agent,
        headers: {
          "content-type": "application/x-www-form-urlencoded",
          authorization: `Bearer ${verifier}`,
        },
        body: new URLSearchParams({ token }).toString(),
      });
      expect(res.statusCode).toBe(200);
      return (await res.body.json()) as Record<string, unknown>;
    }

    /** Refreshed on the unbounded instance at t0+1700 s and t0+3400 s (the refresh tokens live 1800 s): its last pair. */
    async function warmUnbounded(t0: number, refreshToken: string) {
      clock.pin(t0 + 1700 * S);
      const first = await refreshOn(unbounded().grpc(), refreshToken);
      clock.pin(t0 + 3400 * S);
      return refreshOn(unbounded().grpc(), first.refreshToken);
    }

    it("refuses a token minted past its session's end once the end comes: TOKEN_EXPIRED on a call, EXPIRED to VerifyCredential, inactive to introspection", async () => {
      const t0 = wholeSecond();
      clock.pin(t0);
      const login = await loginAt(unbounded(), root);
      const end = t0 + MAX * S;
      // Kept warm near the end where nothing bounds it: an access token to t0+4000 s.
      const late = await warmUnbounded(t0, login.refreshToken);
      expect(at(late.accessTokenExpiresAt)).toBe(t0 + 4000 * S);

      // Before the end: accepted, and what is told of its end is the session's.
      clock.pin(end - S);
      expect((await current(bounded(), late.accessToken)).username).toMatch(/^sl-/);
      const before = await verify(late.accessToken);
      expect(before.valid).toBe(true);
      expect(at(before.expiresAt)).toBe(end);
      expect(await introspect(late.accessToken)).toMatchObject({ active: true, exp: end / S });

      // At the end: the same claims and the same cached row, refused (no principal kept from before).
      clock.pin(end);
      expect(await reasonOf(current(bounded(), late.accessToken))).toBe("TOKEN_EXPIRED");
      expect(await verificationCodes([bounded()], verifier, late.accessToken)).toEqual(["EXPIRED"]);
      expect(await introspect(late.accessToken)).toEqual({ active: false });
      // The session itself is not revoked: only its time is up.
      const em = bounded().app.storage.em.fork();
      expect((await em.findOneOrFail(Session, { id: login.sid })).revokedAt ?? null).toBeNull();
    });

    it("changes nothing where sessions have no bound (auth.sessionMaxLifetime 0)", async () => {
      const t0 = wholeSecond();
      clock.pin(t0);
      const login = await loginAt(unbounded(), root);
      const late = await warmUnbounded(t0, login.refreshToken);
      clock.pin(t0 + 3900 * S);
      expect((await current(unbounded(), late.accessToken)).username).toMatch(/^sl-/);
      const verified = await createClient(
        VerificationService,
        withHeaders(unbounded().connect(), { authorization: `Bearer ${verifier}` }),
      ).verifyCredential({ credential: late.accessToken });
      expect(verified.valid).toBe(true);
      expect(at(verified.expiresAt)).toBe(t0 + 4000 * S);
    });
  },
);
