import type { Interceptor } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  AuthenticationError,
  Code,
  TokenExpiredError,
  type TokenPair,
  UserAPI,
  type UserAPIOptions,
} from "../src/sdk/index.js";
import { ADMIN_PASSWORD, DATABASES, pinnableClock, startTestServer, type TestServer } from "./helpers.js";

/** The `exp` claim of a JWT (seconds). */
function expOf(token: string): number {
  return (JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString()) as { exp: number }).exp;
}

/** An interceptor counting the RefreshToken calls a client makes. */
function refreshCounter(): { interceptor: Interceptor; count: () => number } {
  let n = 0;
  return {
    interceptor: (next) => (req) => {
      if (req.method.name === "RefreshToken") n++;
      return next(req);
    },
    count: () => n,
  };
}

describe.each(DATABASES)("automatic refresh across a real expiry on $name", (db) => {
  let ts: TestServer;
  const make = (options: UserAPIOptions) =>
    new UserAPI({ host: "127.0.0.1", port: ts.server.port, certFolder: ts.certs.clientDir, ...options });

  // The server's clock: the machine's, pinned to step the server across a token's expiry
  // (the SDK reads the machine's clock, which the test leaves alone).
  const clock = pinnableClock();

  beforeAll(async () => {
    // Access tokens live 2 s and no skew is tolerated. Started a minute in the past, so that
    // its first signing key is already active when a test holds the server behind the
    // machine's clock.
    clock.pin(Date.now() - 60_000);
    ts = await startTestServer(db, { auth: { jwt: { accessTokenTtl: 2, clockSkew: 0 } } }, undefined, {
      clock: clock.now,
    });
    clock.release();
  });
  afterEach(() => {
    clock.release();
  });
  afterAll(async () => {
    await ts.close();
  });

  it("raises TokenExpiredError without auto-refresh, and with it retries once after one shared refresh", async () => {
    const pairs: TokenPair[] = [];
    const grpcRefreshes = refreshCounter();
    const connectRefreshes = refreshCounter();
    const grpc = make({
      protocol: "grpc",
      autoRefresh: { proactive: false },
      onTokens: (p) => void pairs.push(p),
      interceptors: [grpcRefreshes.interceptor],
    });
    const connect = make({
      protocol: "connect",
      autoRefresh: { proactive: false },
      interceptors: [connectRefreshes.interceptor],
    });
    const login = await grpc.login("admin", ADMIN_PASSWORD);
    const connectLogin = await connect.login("admin", ADMIN_PASSWORD);
    const plain = make({ token: login.accessToken });
    expect(pairs).toHaveLength(1);

    // The server at the later of the two `exp`s (the logins may straddle a second boundary):
    // both sessions' access tokens have just expired.
    clock.pin(Math.max(expOf(login.accessToken), expOf(connectLogin.accessToken)) * 1000);

    const expired = await plain.getUser().catch((e: unknown) => e);
    expect(expired).toBeInstanceOf(TokenExpiredError);
    expect(expired).toBeInstanceOf(AuthenticationError);
    expect((expired as TokenExpiredError).code).toBe(Code.Unauthenticated);
    expect((expired as TokenExpiredError).reason).toBe("TOKEN_EXPIRED");

    // Three concurrent calls each see TOKEN_EXPIRED; one refresh serves them all. A second
    // refresh would spend the refresh token twice and the server would revoke the session.
    const results = await Promise.all([
      grpc.getUser(),
      grpc.getUser(),
      grpc.getUser(),
      connect.getUser(),
      connect.getUser(),
    ]);
    expect(results.map((u) => u.username)).toEqual(["admin", "admin", "admin", "admin", "admin"]);
    expect(pairs).toHaveLength(2);
    expect(grpcRefreshes.count()).toBe(1);
    expect(connectRefreshes.count()).toBe(1);
    expect(grpc.token).toBe(pairs[1]!.accessToken);
    expect(grpc.token).not.toBe(login.accessToken);
    expect(grpc.currentRefreshToken).toBe(pairs[1]!.refreshToken);
    for (const api of [grpc, connect, plain]) api.close();
  });

  it("renews shortly before expiry, once for concurrent calls", async () => {
    const pairs: TokenPair[] = [];
    const refreshes = refreshCounter();
    const api = make({
      protocol: "connect",
      autoRefresh: true,
      onTokens: (p) => void pairs.push(p),
      interceptors: [refreshes.interceptor],
    });
    // Lifetime 2 s: the client renews in the last second (half the lifetime, as the leeway is
    // capped). On a server held 1.5 s behind the machine's clock, the token is in its last
    // second by the client's (machine) clock at once, and valid for the server throughout.
    clock.pin(Date.now() - 1500);
    const login = await api.login("admin", ADMIN_PASSWORD);
    expect(expOf(login.accessToken) * 1000 - Date.now()).toBeLessThanOrEqual(1000);
    const results = await Promise.all(Array.from({ length: 5 }, () => api.getUser()));
    expect(results.every((u) => u.username === "admin")).toBe(true);
    expect(pairs).toHaveLength(2);
    expect(refreshes.count()).toBe(1);
    expect(api.token).toBe(pairs[1]!.accessToken);
    expect(api.token).not.toBe(login.accessToken);
    // The session survived: no refresh token was spent twice (which revokes the family).
    const next = await api.refreshToken();
    expect(next.accessToken).toBe(api.token);
    api.close();
  });

  it("fails with the refresh's reason when the session was ended meanwhile", async () => {
    const api = make({ autoRefresh: true });
    const login = await api.login("admin", ADMIN_PASSWORD);
    const other = make({});
    await other.logout(login.refreshToken);
    clock.pin(expOf(login.accessToken) * 1000);
    const err = await api.getUser().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AuthenticationError);
    expect((err as AuthenticationError).reason).toBe("TOKEN_REVOKED");
    expect((err as Error).message).not.toContain(login.refreshToken);
    api.close();
    other.close();
  });
});
