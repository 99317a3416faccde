import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, createClient, type Transport } from "@connectrpc/connect";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { verifySecret } from "../../src/auth/password.js";
import { pruneSessions, type SessionPruneOptions } from "../../src/services/user/session-pruning.js";
import { SessionIssuer } from "../../src/services/user/sessions.js";
import { RefreshToken, Session, User } from "../../src/storage/entities.js";
import { rejection } from "../errors-util.js";
import { clientFor, DATABASES, startTestServer, type TestDatabase, type TestServer } from "../helpers.js";
import { adminLogin, bearerMachine, short } from "../machine-fixtures.js";

/**
 * Sessions end everywhere (issue 18, item 4): ending a session (logout, refresh-token
 * reuse, password change or reset, disabling the user) refuses the access tokens already
 * issued to it on the very next request, over TLS on every protocol. Every credential is
 * used (twice, so the SQLite state cache and the verified-token cache hold it, and the
 * next call takes the synchronous path) before the session ends: a stale cache would show
 * as an accepted call.
 */

const PASSWORD = "sessions test password";

describe.each(DATABASES)("sessions end everywhere ($name)", (db) => {
  let ts: TestServer;
  let root: ReturnType<typeof userClients>;

  const userClients = (transport: Transport, token?: string) => ({
    users: clientFor(UserService, transport, token),
    tokens: clientFor(TokenService, transport, token),
  });

  beforeAll(async () => {
    ts = await startTestServer(db);
    root = userClients(ts.connect(), await adminLogin(ts.connect()));
  });
  afterAll(async () => {
    await ts.close();
  });

  /** A new user with `sessions` logins (access + refresh token each). */
  async function user(sessions = 1) {
    const username = `ses-${short()}`;
    const { user } = await root.users.createUser({ username, password: PASSWORD, scopes: ["cluster:read"] });
    const logins = [];
    for (let i = 0; i < sessions; i++)
      logins.push(await createClient(UserService, ts.connect()).login({ username, password: PASSWORD }));
    return { id: user!.id, username, logins };
  }

  /** The outcome of GetCurrentUser with `token` over Connect and gRPC: "ok" or the refusal's reason. */
  async function outcomes(token: string): Promise<string[]> {
    const out: string[] = [];
    for (const transport of [ts.connect(), ts.grpc()]) {
      out.push(
        await clientFor(UserService, transport, token)
          .getCurrentUser({})
          .then(
            () => "ok",
            async (err: unknown) => {
              const r = await rejection(Promise.reject(err));
              return r.code === Code.Unauthenticated ? (r.reason ?? "no reason") : `code ${r.code}`;
            },
          ),
      );
    }
    return out;
  }

  /** Use `token` twice on each protocol (warming every cache) and expect it accepted. */
  async function warm(...tokens: string[]) {
    for (const token of tokens)
      for (let i = 0; i < 2; i++) expect(await outcomes(token)).toEqual(["ok", "ok"]);
  }

  const refused = ["TOKEN_REVOKED", "TOKEN_REVOKED"];

  it("names the session in the access token, and keeps it across refreshes", async () => {
    const u = await user();
    const login = u.logins[0]!;
    const sid = decodeJwt(login.accessToken).sid;
    expect(typeof sid).toBe("string");
    const refreshed = await createClient(UserService, ts.connect()).refreshToken({
      refreshToken: login.refreshToken,
    });
    expect(decodeJwt(refreshed.accessToken).sid).toBe(sid);
    const other = await createClient(UserService, ts.connect()).login({
      username: u.username,
      password: PASSWORD,
    });
    expect(decodeJwt(other.accessToken).sid).not.toBe(sid);
  });

  it("refuses a logged-out session's access token on the next request and leaves the user's other sessions alone", async () => {
    const u = await user(2);
    const [a, b] = u.logins as [(typeof u.logins)[0], (typeof u.logins)[0]];
    await warm(a.accessToken, b.accessToken);
    await createClient(UserService, ts.connect()).logout({ refreshToken: a.refreshToken });
    expect(await outcomes(a.accessToken)).toEqual(refused);
    expect(await outcomes(b.accessToken)).toEqual(["ok", "ok"]);
    const r = await rejection(
      createClient(UserService, ts.connect()).refreshToken({ refreshToken: a.refreshToken }),
    );
    expect(r.reason).toBe("TOKEN_REVOKED");
  });

  it("refuses both the thief's and the victim's access tokens once a refresh token is reused", async () => {
    const u = await user(2);
    const [victim, bystander] = u.logins as [(typeof u.logins)[0], (typeof u.logins)[0]];
    // The thief spends the stolen refresh token first and gets a working pair of its own.
    const thief = await createClient(UserService, ts.grpc()).refreshToken({
      refreshToken: victim.refreshToken,
    });
    await warm(victim.accessToken, thief.accessToken, bystander.accessToken);
    // The victim's client then spends the same refresh token: a reuse.
    const reuse = await rejection(
      createClient(UserService, ts.connect()).refreshToken({ refreshToken: victim.refreshToken }),
    );
    expect(reuse.reason).toBe("TOKEN_REVOKED");
    expect(await outcomes(thief.accessToken)).toEqual(refused);
    expect(await outcomes(victim.accessToken)).toEqual(refused);
    const again = await rejection(
      createClient(UserService, ts.connect()).refreshToken({ refreshToken: thief.refreshToken }),
    );
    expect(again.reason).toBe("TOKEN_REVOKED");
    // Another session of the same user was not stolen and goes on.
    expect(await outcomes(bystander.accessToken)).toEqual(["ok", "ok"]);
  });

  it("refuses an access token minted with a reused refresh token that was never used before", async () => {
    const u = await user();
    const victim = u.logins[0]!;
    const thief = await createClient(UserService, ts.connect()).refreshToken({
      refreshToken: victim.refreshToken,
    });
    await rejection(
      createClient(UserService, ts.connect()).refreshToken({ refreshToken: victim.refreshToken }),
    );
    // First use: verified from scratch (the asynchronous path), refused all the same.
    expect(await outcomes(thief.accessToken)).toEqual(refused);
  });

  /** A user with two sessions, a personal access token and an API key, all used once. */
  async function userWithTokens() {
    const u = await user(2);
    const own = userClients(ts.connect(), u.logins[0]!.accessToken);
    const pat = (await own.tokens.createPersonalAccessToken({ name: "pat" })).token;
    const key = (await own.tokens.createApiKey({ name: "key" })).key;
    await warm(...u.logins.map((l) => l.accessToken), pat, key);
    return { ...u, own, pat, key };
  }

  for (const revokeTokens of [false, true]) {
    it(`ends every session of a user changing its password, ${revokeTokens ? "and revokes" : "but keeps"} its tokens with revoke_tokens: ${revokeTokens}`, async () => {
      const u = await userWithTokens();
      const newPassword = "a new password for sessions";
      await u.own.users.changePassword({ currentPassword: PASSWORD, newPassword, revokeTokens });
      for (const login of u.logins) expect(await outcomes(login.accessToken)).toEqual(refused);
      const tokens = revokeTokens ? refused : ["ok", "ok"];
      expect(await outcomes(u.pat)).toEqual(tokens);
      expect(await outcomes(u.key)).toEqual(tokens);
      const fresh = await createClient(UserService, ts.connect()).login({
        username: u.username,
        password: newPassword,
      });
      expect(await outcomes(fresh.accessToken)).toEqual(["ok", "ok"]);
    });

    it(`ends every session of a user whose password an administrator resets, ${revokeTokens ? "and revokes" : "but keeps"} its tokens with revoke_tokens: ${revokeTokens}`, async () => {
      const u = await userWithTokens();
      await root.users.updateUser({ id: u.id, password: "reset by an administrator", revokeTokens });
      for (const login of u.logins) expect(await outcomes(login.accessToken)).toEqual(refused);
      const tokens = revokeTokens ? refused : ["ok", "ok"];
      expect(await outcomes(u.pat)).toEqual(tokens);
      expect(await outcomes(u.key)).toEqual(tokens);
    });
  }

  it("revokes only the tokens of the user named, not those of another user", async () => {
    const a = await userWithTokens();
    const b = await userWithTokens();
    await root.users.updateUser({ id: a.id, password: "reset by an administrator", revokeTokens: true });
    expect(await outcomes(a.pat)).toEqual(refused);
    expect(await outcomes(b.pat)).toEqual(["ok", "ok"]);
    expect(await outcomes(b.key)).toEqual(["ok", "ok"]);
    for (const login of b.logins) expect(await outcomes(login.accessToken)).toEqual(["ok", "ok"]);
  });

  it("ends the sessions of a disabled user for good: enabling it again does not revive them", async () => {
    const u = await userWithTokens();
    await root.users.updateUser({ id: u.id, disabled: true });
    const disabled = ["PRINCIPAL_DISABLED", "PRINCIPAL_DISABLED"];
    for (const login of u.logins) expect(await outcomes(login.accessToken)).toEqual(disabled);
    expect(await outcomes(u.pat)).toEqual(disabled);
    await root.users.updateUser({ id: u.id, disabled: false });
    for (const login of u.logins) expect(await outcomes(login.accessToken)).toEqual(refused);
    const r = await rejection(
      createClient(UserService, ts.connect()).refreshToken({ refreshToken: u.logins[0]!.refreshToken }),
    );
    expect(r.reason).toBe("TOKEN_REVOKED");
    // Tokens survive a disable (they are refused while the user is disabled, then work again).
    expect(await outcomes(u.pat)).toEqual(["ok", "ok"]);
    const fresh = await createClient(UserService, ts.connect()).login({
      username: u.username,
      password: PASSWORD,
    });
    expect(await outcomes(fresh.accessToken)).toEqual(["ok", "ok"]);
  });

  for (const change of ["password reset", "disable"] as const) {
    it(`does not let a login that verified the password before a ${change} keep its session`, async () => {
      // A login reads the user, then spends ~200 ms in PBKDF2: the change lands in between.
      // Not drivable deterministically over the wire, so the login's last step is run on
      // the row it read before the change.
      const u = await user(0);
      const em = ts.app.storage.em.fork();
      const readByLogin = await em.findOneOrFail(User, { id: u.id });
      await root.users.updateUser(
        change === "disable"
          ? { id: u.id, disabled: true }
          : { id: u.id, password: "changed during the login" },
      );
      const issuer = new SessionIssuer(ts.app.jwt, 3600);
      await expect(issuer.issue(em, readByLogin)).rejects.toMatchObject({ reason: "CREDENTIALS_INVALID" });
      // Nor when the login's password is checked against the hash now stored, as Login does
      // (a concurrent re-hash of the same password is no change): it is not that password.
      const withPassword = issuer.issue(em, readByLogin, undefined, undefined, (stored) =>
        verifySecret(PASSWORD, stored),
      );
      await expect(withPassword).rejects.toMatchObject({ reason: "CREDENTIALS_INVALID" });
      expect(await ts.app.storage.em.fork().count(Session, { userId: u.id, revokedAt: null })).toBe(0);
    });
  }

  it("refuses a user access token without a session as an ended session's (only a leaked signing key mints one now)", async () => {
    const u = await user();
    const { tenantId } = (await root.users.getUser({ id: u.id })).user!;
    // What a holder of the signing key could mint: every user token Tessera issues names its session.
    const sidless = await ts.app.jwt.issue({
      subject: u.id,
      tenantId,
      scopes: ["cluster:read"],
      kind: "user",
      username: u.username,
    });
    expect(decodeJwt(sidless.token).sid).toBeUndefined();
    // Refused while the user and its session stand: revoking every session of a user ends
    // every access token of it.
    await warm(u.logins[0]!.accessToken);
    expect(await outcomes(sidless.token)).toEqual(refused);
    expect(await outcomes(sidless.token)).toEqual(refused);
    // Asked by a machine user's access token: a JWT without `sid` too, of the other kind, still accepted.
    const mu = await bearerMachine(ts.connect(), await adminLogin(ts.connect()), [], {
      scopes: ["auth:verify"],
    });
    const machineJwt = await clientFor(MachineUserService, ts.connect(), mu.token).issueAccessToken({});
    const machineClaims = decodeJwt(machineJwt.accessToken);
    expect([machineClaims.pk, machineClaims.sid]).toEqual(["machine", undefined]);
    const verify = clientFor(VerificationService, ts.connect(), machineJwt.accessToken);
    const { code } = await verify.verifyCredential({ credential: sidless.token });
    expect(VerificationCode[code]).toBe("REVOKED");
    expect(
      VerificationCode[(await verify.verifyCredential({ credential: u.logins[0]!.accessToken })).code],
    ).toBe("VALID");
  });

  it("keeps answering authenticated calls from the state cache while other users log in", async () => {
    const u = await user();
    const other = await user(0);
    const token = u.logins[0]!.accessToken;
    await warm(token);
    const before = ts.app.sql.cacheStats();
    // Each login opens a session (an insert into a watched table): that must not empty the cache.
    for (let i = 0; i < 3; i++)
      await createClient(UserService, ts.connect()).login({ username: other.username, password: PASSWORD });
    expect(await outcomes(token)).toEqual(["ok", "ok"]);
    const after = ts.app.sql.cacheStats();
    expect(after.invalidations - before.invalidations).toBe(0);
    expect(after.enabled).toBe(true);
    expect(after.misses - before.misses).toBe(0);
  });
});

describe.each(DATABASES)("sessions end on every instance ($name)", (db) => {
  let dir: string;
  let a: TestServer;
  let b: TestServer;

  beforeAll(async () => {
    // Two servers on one database: a shared PostgreSQL schema, or one SQLite file that
    // another process writes (seen through PRAGMA data_version).
    dir = mkdtempSync(join(tmpdir(), "tessera-sessions-"));
    const url = db.name === "sqlite" ? `sqlite:${join(dir, "tessera.db")}` : db.url();
    const shared: TestDatabase = { ...db, url: () => url };
    a = await startTestServer(shared);
    b = await startTestServer(shared);
  });
  afterAll(async () => {
    await b.close();
    await a.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** GetCurrentUser on `server` with `token`: "ok" or the refusal's reason. */
  const outcome = (server: TestServer, token: string) =>
    clientFor(UserService, server.connect(), token)
      .getCurrentUser({})
      .then(
        () => "ok",
        async (err: unknown) => (await rejection(Promise.reject(err))).reason,
      );

  it("refuses on one instance the access token of a session ended through another", async () => {
    const root = clientFor(UserService, a.connect(), await adminLogin(a.connect()));
    const username = `inst-${short()}`;
    await root.createUser({ username, password: PASSWORD, scopes: [] });
    const login = await createClient(UserService, a.connect()).login({ username, password: PASSWORD });
    const other = await createClient(UserService, b.connect()).login({ username, password: PASSWORD });
    for (let i = 0; i < 2; i++) {
      expect(await outcome(b, login.accessToken)).toBe("ok");
      expect(await outcome(a, other.accessToken)).toBe("ok");
    }
    await createClient(UserService, a.connect()).logout({ refreshToken: login.refreshToken });
    expect(await outcome(b, login.accessToken)).toBe("TOKEN_REVOKED");
    expect(await outcome(a, login.accessToken)).toBe("TOKEN_REVOKED");
    // A password change through the second instance ends the session opened there, on the first.
    await clientFor(UserService, b.connect(), other.accessToken).changePassword({
      currentPassword: PASSWORD,
      newPassword: "changed on the other instance",
    });
    expect(await outcome(a, other.accessToken)).toBe("TOKEN_REVOKED");
  });
});

/**
 * The sessions table is pruned (issue 18's remaining item 5): a session that ended (revoked,
 * or its last refresh token expired) longer ago than the retention is deleted with its
 * refresh tokens, in batches, and on a timer; never one whose access tokens could still verify.
 */
describe.each(DATABASES)("pruning ended sessions ($name)", (db) => {
  let ts: TestServer;
  const REFRESH_TTL = 3600;
  const MAX_TTL = 900;
  const SKEW = 30;
  const HOUR = 3600_000;
  const options = (now: number, batchSize?: number): SessionPruneOptions => ({
    refreshTokenTtlSeconds: REFRESH_TTL,
    maxTokenTtlSeconds: MAX_TTL,
    clockSkewSeconds: SKEW,
    now: () => now,
    ...(batchSize ? { batchSize } : {}),
  });

  beforeAll(async () => {
    ts = await startTestServer(db, {
      auth: {
        jwt: { refreshTokenTtl: REFRESH_TTL, accessTokenTtl: 600, clockSkew: SKEW },
        maxTokenTtl: MAX_TTL,
        sessionPruneInterval: 1,
      },
    });
  });
  afterAll(async () => {
    await ts.close();
  });

  async function login() {
    const username = `prune-${short()}`;
    // A fresh admin session each time: a pruning with a clock hours ahead ends every session
    // whose refresh token "expired" by then, the admin's too.
    const root = await adminLogin(ts.connect());
    await clientFor(UserService, ts.connect(), root).createUser({ username, password: PASSWORD, scopes: [] });
    const res = await createClient(UserService, ts.connect()).login({ username, password: PASSWORD });
    return { ...res, sid: decodeJwt(res.accessToken).sid as string };
  }
  const exists = async (sid: string) =>
    (await ts.app.storage.em.fork().count(Session, { id: sid })) +
    (await ts.app.storage.em.fork().count(RefreshToken, { familyId: sid }));
  const whoAmI = (token: string) =>
    clientFor(UserService, ts.grpc(), token)
      .getCurrentUser({})
      .then(
        () => "ok",
        async (err: unknown) => (await rejection(Promise.reject(err))).reason,
      );
  const logout = (refreshToken: string) => createClient(UserService, ts.connect()).logout({ refreshToken });

  it("keeps a live session and one just revoked: their access tokens still verify, or are still refused as revoked", async () => {
    const live = await login();
    const ended = await login();
    await logout(ended.refreshToken);
    const em = ts.app.storage.em.fork();
    await pruneSessions(em, options(Date.now()));
    // Up to just before the retention has passed since the revocation, nothing goes either.
    await pruneSessions(em, options(Date.now() + REFRESH_TTL * 1000 - 60_000));
    expect(await exists(live.sid)).toBeGreaterThan(1);
    expect(await exists(ended.sid)).toBeGreaterThan(1);
    expect(await whoAmI(live.accessToken)).toBe("ok");
    expect(await whoAmI(ended.accessToken)).toBe("TOKEN_REVOKED");
    const refreshed = await createClient(UserService, ts.connect()).refreshToken({
      refreshToken: live.refreshToken,
    });
    expect(await whoAmI(refreshed.accessToken)).toBe("ok");
    expect(
      (
        await rejection(
          createClient(UserService, ts.connect()).refreshToken({ refreshToken: ended.refreshToken }),
        )
      ).reason,
    ).toBe("TOKEN_REVOKED");
  });

  it("deletes a revoked session and its refresh tokens once the retention has passed, and a never-revoked one once its last refresh token expired that long ago", async () => {
    const revoked = await login();
    await logout(revoked.refreshToken);
    const idle = await login();
    const em = ts.app.storage.em.fork();
    // Retention: max(refresh lifetime, maxTokenTtl + skew) = 1 h. Revoked now: gone after 1 h.
    await pruneSessions(em, options(Date.now() + HOUR + 60_000));
    expect(await exists(revoked.sid)).toBe(0);
    // Never revoked: its refresh token expires in 1 h, so it goes 1 h after that, not before.
    expect(await exists(idle.sid)).toBeGreaterThan(1);
    await pruneSessions(em, options(Date.now() + 2 * HOUR - 60_000));
    expect(await exists(idle.sid)).toBeGreaterThan(1);
    await pruneSessions(em, options(Date.now() + 2 * HOUR + 60_000));
    expect(await exists(idle.sid)).toBe(0);
    // A refresh token of a pruned session can only be refused.
    const r = await rejection(
      createClient(UserService, ts.connect()).refreshToken({ refreshToken: idle.refreshToken }),
    );
    expect(r.code).toBe(Code.Unauthenticated);
  });

  it("never keeps a session longer than an access token can verify, even with a refresh lifetime shorter than maxTokenTtl", async () => {
    const s = await login();
    await logout(s.refreshToken);
    const em = ts.app.storage.em.fork();
    const short: SessionPruneOptions = { ...options(Date.now() + 600_000), refreshTokenTtlSeconds: 60 };
    // 10 minutes after: past the refresh lifetime, not past maxTokenTtl + skew (930 s).
    await pruneSessions(em, short);
    expect(await exists(s.sid)).toBeGreaterThan(1);
    await pruneSessions(em, { ...short, now: () => Date.now() + 931_000 + 5_000 });
    expect(await exists(s.sid)).toBe(0);
  });

  it("deletes in batches until none is left", async () => {
    const sids: string[] = [];
    for (let i = 0; i < 7; i++) {
      const s = await login();
      await logout(s.refreshToken);
      sids.push(s.sid);
    }
    const deleted = await pruneSessions(ts.app.storage.em.fork(), options(Date.now() + 2 * HOUR + 60_000, 3));
    expect(deleted).toBeGreaterThanOrEqual(7);
    for (const sid of sids) expect(await exists(sid)).toBe(0);
  });

  it("prunes on the server's timer (auth.sessionPruneInterval)", async () => {
    const s = await login();
    await logout(s.refreshToken);
    // Revoked long ago (as if the server had been up for days): the next tick deletes it.
    await ts.app.storage.em
      .fork()
      .nativeUpdate(Session, { id: s.sid }, { revokedAt: new Date(Date.now() - 3 * HOUR) });
    const deadline = Date.now() + 10_000;
    while ((await exists(s.sid)) > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(await exists(s.sid)).toBeLessThanOrEqual(1);
    expect(await ts.app.storage.em.fork().count(Session, { id: s.sid })).toBe(0);
  });
});
