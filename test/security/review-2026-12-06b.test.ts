import { createClient, type Transport } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";
import { adminLogin, basic, clients, short } from "../machine-fixtures.js";
import { freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * Adversarial review of 2026-12-06 (b): sessions, refresh tokens, OAuth grants and the
 * exactness of revocation, attacked over TLS as a client would.
 */

const PASSWORD = "review b password";

/** A client address no other test of the file uses. */
const freshIp = freshIps("100.72");

describe.each(DATABASES)("review 2026-12-06b on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let root: string;

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: LIMITS_ON,
      server: { trustedProxies: ["127.0.0.1"] },
      // Hashing slow enough that a second address's guess arrives while the first one's
      // PBKDF2 runs; one thread, so that every PBKDF2 run is another wait.
      auth: { passwordIterations: 100_000, hashConcurrency: 1, hashQueue: 1000 },
    });
    transport = ts.connect();
    root = await adminLogin(withHeaders(transport, { "x-forwarded-for": freshIp() }));
  });
  afterAll(async () => {
    await ts.close();
  });

  /** GetCurrentUser with HTTP Basic from `ip`: "ok", or the refusal's reason. */
  async function basicCall(ip: string, username: string, password: string): Promise<string> {
    const users = createClient(
      UserService,
      withHeaders(transport, { ...basic(username, password), "x-forwarded-for": ip }),
    );
    try {
      await users.getCurrentUser({});
      return "ok";
    } catch (err) {
      return (await rejection(Promise.reject(err))).reason ?? "no reason";
    }
  }

  /** Resolves once the hash pool has started more PBKDF2 runs than `count`. */
  async function hashingStarted(count: number): Promise<void> {
    await expect
      .poll(() => hashPool().stats().started, { timeout: 10_000, interval: 1 })
      .toBeGreaterThan(count);
  }

  /**
   * What guessing `username`'s password over HTTP Basic shows an attacker holding two
   * addresses: five rounds, each one guess sent from the first address and, while its
   * PBKDF2 runs, the same guess from the second; then a sixth guess from the second.
   * The PBKDF2 runs the rounds took (their time) and every answer.
   */
  async function guessFromTwoAddresses(username: string) {
    const [first, second] = [freshIp(), freshIp()];
    const answers: string[] = [];
    const before = hashPool().stats().started;
    for (let round = 0; round < 5; round++) {
      const guess = `wrong guess ${round} ${short()}`;
      const started = hashPool().stats().started;
      const leading = basicCall(first, username, guess);
      await hashingStarted(started);
      const following = basicCall(second, username, guess);
      answers.push(await leading, await following);
    }
    const runs = hashPool().stats().started - before;
    answers.push(await basicCall(second, username, `sixth guess ${short()}`));
    return { runs, answers };
  }

  it("HTTP Basic shows an attacker the same work and answers for a wrong password whether or not the user exists, from several addresses at once", async () => {
    const username = `enum-${short()}`;
    await clients(withHeaders(transport, { "x-forwarded-for": freshIp() }), root).users.createUser({
      username,
      password: PASSWORD,
      scopes: [],
    });
    // The stand-in hash of unknown names is made once, at its first use: not during a round.
    expect(await basicCall(freshIp(), `nobody-${short()}`, "warm up")).toBe("CREDENTIALS_INVALID");

    const unknown = await guessFromTwoAddresses(`nobody-${short()}`);
    const existing = await guessFromTwoAddresses(username);
    // An unknown name: every guess from either address is a PBKDF2 run, refused, and the
    // second address is locked out of the name after its five.
    expect(unknown).toEqual({
      runs: 10,
      answers: [...Array(10).fill("CREDENTIALS_INVALID"), "RATE_LIMITED"],
    });
    // An existing user's: the same. Were the second address's guesses answered from the
    // first's PBKDF2, an existing name would take half the time and never lock it out.
    expect(existing).toEqual(unknown);
  });

  it("a refresh refused while the session's tenant is disabled spends nothing: the session goes on once the tenant is enabled again", async () => {
    const from = withHeaders(transport, { "x-forwarded-for": freshIp() });
    const admin = clients(from, root);
    const { tenant } = await admin.tenants.createTenant({ name: `suspended-${short()}` });
    const username = `member-${short()}`;
    await admin.users.createUser({ username, password: PASSWORD, scopes: [], tenantId: tenant!.id });
    const users = createClient(UserService, from);
    const login = await users.login({ username, password: PASSWORD, tenant: tenant!.id });

    await admin.tenants.updateTenant({ id: tenant!.id, disabled: true });
    // A client refreshing on its schedule while the tenant is suspended.
    const refused = await rejection(users.refreshToken({ refreshToken: login.refreshToken }));
    expect(refused.reason).toBe("PRINCIPAL_DISABLED");
    // The tenant's state, not the user's, as every other call of the tenant's is told.
    expect(refused.message).toBe("tenant is disabled");
    await admin.tenants.updateTenant({ id: tenant!.id, disabled: false });

    // Disabling a tenant ends nothing (README): once enabled, its sessions go on as they were,
    // and the refused refresh was no use of the token that a second one would re-use.
    const refreshed = await users.refreshToken({ refreshToken: login.refreshToken });
    for (const token of [login.accessToken, refreshed.accessToken])
      expect((await clients(from, token).users.getCurrentUser({})).username).toBe(username);
  });
});

describe.each(DATABASES)("RFC 7009 revocation with nested token prefixes on $name", (db) => {
  let ts: TestServer;
  let agent: Agent;

  beforeAll(async () => {
    // Nested prefixes are supported (the verifiers try the longest first): an API key then
    // starts with the personal access tokens' prefix too.
    ts = await startTestServer(db, { auth: { tokens: { patPrefix: "rvw_", apiKeyPrefix: "rvw_key_" } } });
    agent = new Agent({ connect: { ca: ts.certs.ca } });
  });
  afterAll(async () => {
    await agent.close();
    await ts.close();
  });

  it("revokes the caller's own API key and personal access token, refused from the next request", async () => {
    const access = await adminLogin(ts.connect());
    const tokens = createClient(
      TokenService,
      withHeaders(ts.connect(), { authorization: `Bearer ${access}` }),
    );
    const { key } = await tokens.createApiKey({ name: `key-${short()}` });
    const { token: pat } = await tokens.createPersonalAccessToken({ name: `pat-${short()}` });
    for (const credential of [key, pat]) {
      expect((await clients(ts.connect(), credential).users.getCurrentUser({})).username).toBe("admin");
      const res = await request(`${ts.server.url}/oauth2/revoke`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": "application/x-www-form-urlencoded", authorization: `Bearer ${access}` },
        body: new URLSearchParams({ token: credential }).toString(),
      });
      await res.body.dump();
      expect(res.statusCode).toBe(200);
      expect(
        (await rejection(clients(ts.connect(), credential).users.getCurrentUser({}))).reason,
        credential.slice(0, 8),
      ).toBe("TOKEN_REVOKED");
    }
  });
});
