import { timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { App } from "../src/app.js";
import { createManualClock, type ManualClock } from "../src/clock.js";
import { Code, rejection } from "./errors-util.js";
import { ADMIN_PASSWORD, clientFor, createTestApp, DATABASES, memoryTransport } from "./helpers.js";
import { adminLogin, bearerMachine, clients, tenantWithAdmin } from "./machine-fixtures.js";

/**
 * Every instant Tessera sets itself (an access token's exp, a rotation's grace period, a
 * refresh token's or a PAT's expiry) ends exactly: accepted 1 ms before it, refused at it,
 * with the clock skew tolerance at its default (30 s), which applies to nbf/iat only.
 * The app runs on a manual clock, stepped across each instant.
 */
describe.each(DATABASES)("instants Tessera sets end exactly ($name)", (db) => {
  let app: App;
  let clock: ManualClock;
  beforeAll(async () => {
    clock = createManualClock();
    // The default skew (30 s): the point is that it does not stretch Tessera's own instants.
    app = await createTestApp(db, {}, { clock: clock.now });
    expect(app.config.auth.jwt.clockSkew).toBe(30);
  });
  afterAll(async () => {
    await app?.close();
  });

  const users = (token?: string) => clientFor(UserService, memoryTransport(app), token);
  const login = () => users().login({ username: "admin", password: ADMIN_PASSWORD });

  it("refuses an access token at its exp, cached or seen for the first time, not 30 s later", async () => {
    const start = clock.now();
    const seen = (await login()).accessToken;
    const unseen = (await login()).accessToken;
    const { exp } = decodeJwt(seen) as { exp: number };
    expect(decodeJwt(unseen).exp).toBe(exp);
    clock.set(exp * 1000 - 1);
    expect((await users(seen).getCurrentUser({})).username).toBe("admin");
    clock.set(exp * 1000);
    // Verified before (the cache's check) and never verified (the full verification).
    for (const token of [seen, unseen]) {
      const r = await rejection(users(token).getCurrentUser({}));
      expect(r.code).toBe(Code.Unauthenticated);
      expect(r.reason).toBe("TOKEN_EXPIRED");
    }
    clock.set(start);
  });

  it("still tolerates the skew on nbf: a token from an instance whose clock runs ahead is valid at once", async () => {
    const token = (await login()).accessToken;
    const early = (await login()).accessToken;
    const { iat } = decodeJwt(token) as { iat: number };
    expect(decodeJwt(early).iat).toBe(iat);
    const start = clock.now();
    clock.set(iat * 1000 - 20_000);
    expect((await users(token).getCurrentUser({})).username).toBe("admin");
    // Past the tolerance: not yet valid (a token never verified before; a verified one stays verified).
    clock.set(iat * 1000 - 31_000);
    expect((await rejection(users(early).getCurrentUser({}))).reason).toBe("TOKEN_INVALID");
    clock.set(start);
  });

  it("ends a machine credential's grace period, and the tokens issued in it, exactly", async () => {
    const root = await adminLogin(memoryTransport(app));
    const b = await tenantWithAdmin(memoryTransport(app), root);
    const { machine, token } = await bearerMachine(memoryTransport(app), b.token, []);
    const as = (t: string) => clients(memoryTransport(app), t).machines;
    const before = (await as(token).issueAccessToken({})).accessToken;
    clock.advance(1000);
    const rotatedAt = clock.now();
    const rotated = await as(b.token).rotateMachineUserCredentials({
      id: machine.id,
      gracePeriodSeconds: 60,
    });
    const graceEnd = rotatedAt + 60_000;
    // Past the rotation's second (IssueAccessToken never issues in it).
    clock.advance(1000);
    const fromOld = (await as(token).issueAccessToken({})).accessToken;
    const fromOldUnseen = (await as(token).issueAccessToken({})).accessToken;
    const exp = decodeJwt(fromOld).exp! * 1000;
    expect(exp).toBeLessThanOrEqual(graceEnd);
    expect(exp).toBeGreaterThan(graceEnd - 2000);

    clock.set(exp - 1);
    expect((await as(fromOld).checkAuthentication({})).machineUserId).toBe(machine.id);
    clock.set(exp);
    for (const t of [fromOld, fromOldUnseen])
      expect((await rejection(as(t).checkAuthentication({}))).reason).toBe("TOKEN_EXPIRED");

    // The previous credential and the token issued before the rotation: until the grace
    // period's last millisecond, not one past it.
    clock.set(graceEnd - 1);
    expect((await as(token).checkAuthentication({})).machineUserId).toBe(machine.id);
    expect((await as(before).checkAuthentication({})).machineUserId).toBe(machine.id);
    clock.set(graceEnd);
    for (const t of [token, before])
      expect((await rejection(as(t).checkAuthentication({}))).reason).toBe("TOKEN_REVOKED");
    // The new credential is unaffected.
    expect((await as(rotated.token).checkAuthentication({})).machineUserId).toBe(machine.id);
  });

  it("refuses a refresh token at its expiry", async () => {
    const spent = await login();
    const kept = await login();
    const end = timestampDate(kept.refreshTokenExpiresAt!).getTime();
    expect(timestampDate(spent.refreshTokenExpiresAt!).getTime()).toBeLessThanOrEqual(end);
    clock.set(timestampDate(spent.refreshTokenExpiresAt!).getTime() - 1);
    await expect(users().refreshToken({ refreshToken: spent.refreshToken })).resolves.toBeDefined();
    clock.set(end);
    const r = await rejection(users().refreshToken({ refreshToken: kept.refreshToken }));
    expect(r.reason).toBe("TOKEN_EXPIRED");
  });

  it("refuses a personal access token at its expiry", async () => {
    clock.set(Date.now());
    const jwt = (await login()).accessToken;
    const expiresAt = clock.now() + 3_600_000;
    const { token } = await clientFor(TokenService, memoryTransport(app), jwt).createPersonalAccessToken({
      name: "exact",
      expiresAt: timestampFromMs(expiresAt),
    });
    clock.set(expiresAt - 1);
    expect((await users(token).getCurrentUser({})).username).toBe("admin");
    clock.set(expiresAt);
    expect((await rejection(users(token).getCurrentUser({}))).reason).toBe("TOKEN_EXPIRED");
  });
});
