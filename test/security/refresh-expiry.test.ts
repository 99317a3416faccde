import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { rejection } from "../errors-util.js";
import { clientFor, DATABASES, pinnableClock, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, short } from "../machine-fixtures.js";

/**
 * An expired refresh token is only expired: presenting it again (a client's retry) is no
 * re-use. It was spent by its first refusal, so its second presentation read as a theft,
 * answered TOKEN_REVOKED "already used", and ended the session with the access tokens still
 * live in it. A token spent before it expired still ends its session when it comes back.
 */

const PASSWORD = "refresh expiry test password";

describe.each(DATABASES)("an expired refresh token ($name)", (db) => {
  let ts: TestServer;
  let root: string;
  const clock = pinnableClock();

  beforeAll(async () => {
    // An access token outliving the refresh token shows whether its session survives.
    ts = await startTestServer(
      db,
      { auth: { jwt: { accessTokenTtl: 600, refreshTokenTtl: 120 } } },
      undefined,
      { clock: clock.now },
    );
    root = await adminLogin(ts.connect());
  });
  afterAll(async () => {
    clock.release();
    await ts.close();
  });

  async function login() {
    const username = `rx-${short()}`;
    await clientFor(UserService, ts.connect(), root).createUser({ username, password: PASSWORD });
    return createClient(UserService, ts.connect()).login({ username, password: PASSWORD });
  }

  const refresh = (refreshToken: string) =>
    createClient(UserService, ts.grpc()).refreshToken({ refreshToken });
  const reason = async (call: Promise<unknown>) => {
    const r = await rejection(call);
    expect(r.code).toBe(Code.Unauthenticated);
    return r.reason;
  };
  const current = (token: string) => clientFor(UserService, ts.connect(), token).getCurrentUser({});

  it("answers TOKEN_EXPIRED each time it is presented, and leaves the session's live access token alone", async () => {
    clock.pin(Date.now());
    const pair = await login();
    clock.pin(timestampDate(pair.refreshTokenExpiresAt!).getTime());
    expect(await reason(refresh(pair.refreshToken))).toBe("TOKEN_EXPIRED");
    expect(await reason(refresh(pair.refreshToken))).toBe("TOKEN_EXPIRED");
    expect(await reason(refresh(pair.refreshToken))).toBe("TOKEN_EXPIRED");
    expect((await current(pair.accessToken)).username).toMatch(/^rx-/);
  });

  it("still ends the session when a token spent before it expired comes back after", async () => {
    clock.pin(Date.now());
    const first = await login();
    const second = await refresh(first.refreshToken);
    clock.pin(timestampDate(first.refreshTokenExpiresAt!).getTime() + 1);
    expect(await reason(refresh(first.refreshToken))).toBe("TOKEN_REVOKED");
    expect(await reason(current(second.accessToken))).toBe("TOKEN_REVOKED");
    expect(await reason(refresh(second.refreshToken))).toBe("TOKEN_REVOKED");
  });
});
