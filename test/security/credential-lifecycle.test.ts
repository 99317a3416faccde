import { ConnectError, createClient } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { rejection } from "../errors-util.js";
import {
  clientFor,
  DATABASES,
  pinnableClock,
  startTestServer,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { adminLogin, basic, bearerMachine, clients, short } from "../machine-fixtures.js";
import { aSecondAhead, issueOutcome, machineOutcome, signingAfter } from "./fixtures.js";

/**
 * The adversarial review of the credential lifecycle (2026-12-06), over TLS: a credential
 * made with a credential that ends while the new one is being made. CreatePersonalAccessToken
 * and CreateApiKey authenticate their caller, then spend a PBKDF2 (slow by design) on the
 * new secret before inserting it; an end that commits in between (a password change with
 * revoke_tokens, a logout, a revocation of the creating token, a disable) must not leave a
 * new credential standing that it would have ended, had it existed. Else a thief holding a
 * stolen access token keeps a creation in flight and outlives every end the victim can
 * make: the new token is a standing credential. The interleaving is forced, not hoped for:
 * the test's hook on the credential-creation limiter (counted after authentication, before
 * the hash) runs the whole end (committed) first.
 */

const PASSWORD = "lifecycle test password";

describe.each(DATABASES)("credentials made while their maker ends ($name)", (db) => {
  let ts: TestServer;
  let root: string;

  beforeAll(async () => {
    // Rate limits on: the credential-creation count is where the hook sits.
    ts = await startTestServer(db, { rateLimit: { enabled: true } });
    root = await adminLogin(ts.connect());
  });
  afterAll(async () => {
    await ts?.close();
  });

  const users = (token?: string) => clientFor(UserService, ts.connect(), token);
  const tokens = (token?: string) => clientFor(TokenService, ts.connect(), token);

  /** A new user, logged in once. */
  async function user() {
    const username = `life-${short()}`;
    const { user } = await users(root).createUser({ username, password: PASSWORD, scopes: ["cluster:read"] });
    const login = await createClient(UserService, ts.connect()).login({ username, password: PASSWORD });
    return { id: user!.id, tenantId: user!.tenantId, username, login };
  }

  /** Run `end` (to its commit) when the next credential creation of `userId` is counted. */
  function onNextCreation(userId: string, end: () => Promise<unknown>): () => boolean {
    const limiter = ts.app.limits!.credentialCreations;
    const consume = limiter.consume.bind(limiter);
    let ended = false;
    limiter.consume = async (key: string) => {
      if (key === `user:${userId}`) {
        limiter.consume = consume;
        await end();
        ended = true;
      }
      return consume(key);
    };
    return () => {
      limiter.consume = consume;
      return ended;
    };
  }

  /** The outcome of GetCurrentUser with `token`: "ok" or the refusal's reason. */
  function outcome(token: string): Promise<string> {
    return users(token)
      .getCurrentUser({})
      .then(
        () => "ok",
        async (err: unknown) => (await rejection(Promise.reject(err))).reason ?? "no reason",
      );
  }

  type Maker = "session" | "pat" | "basic";
  const ends: {
    name: string;
    makers: Maker[];
    end: (u: Awaited<ReturnType<typeof user>>, maker: { pat?: string; patId?: string }) => Promise<unknown>;
    /** After the end, before the new credential is tried (undo what is not an end for good). */
    after?: (u: Awaited<ReturnType<typeof user>>) => Promise<unknown>;
  }[] = [
    {
      name: "a password change with revoke_tokens",
      makers: ["session", "pat", "basic"],
      end: async (u) => {
        // The victim, from another login of its own.
        const victim = await createClient(UserService, ts.connect()).login({
          username: u.username,
          password: PASSWORD,
        });
        await users(victim.accessToken).changePassword({
          currentPassword: PASSWORD,
          newPassword: "the victim's new password",
          revokeTokens: true,
        });
      },
    },
    {
      name: "an administrator's password reset with revoke_tokens",
      makers: ["session", "pat", "basic"],
      end: (u) =>
        users(root).updateUser({ id: u.id, password: "reset by an administrator", revokeTokens: true }),
    },
    {
      name: "a logout of the creating session",
      makers: ["session"],
      end: (u) => users().logout({ refreshToken: u.login.refreshToken }),
    },
    {
      name: "a revocation of the creating token",
      makers: ["pat"],
      end: (_u, maker) => tokens(root).revokePersonalAccessToken({ id: maker.patId! }),
    },
    {
      name: "a disable of the user (enabled again after)",
      makers: ["session"],
      end: (u) => users(root).updateUser({ id: u.id, disabled: true }),
      after: (u) => users(root).updateUser({ id: u.id, disabled: false }),
    },
  ];

  /** POST /oauth2/revoke of `token`, authenticated by the token itself. */
  async function oauthRevoke(token: string): Promise<number> {
    const agent = new Agent({ connect: { ca: ts.certs.ca } });
    try {
      const res = await request(`${ts.server.url}/oauth2/revoke`, {
        method: "POST",
        dispatcher: agent,
        headers: { "content-type": "application/x-www-form-urlencoded", authorization: `Bearer ${token}` },
        body: new URLSearchParams({ token }).toString(),
      });
      await res.body.text();
      return res.statusCode;
    } finally {
      await agent.close();
    }
  }

  // A stolen token that never expires would otherwise be laundered into one the revocation
  // of the stolen one leaves standing: the expiry bound (review of 2026-12-05) has nothing to
  // bound then.
  for (const way of ["RevokePersonalAccessToken", "POST /oauth2/revoke"] as const)
    it(`ends through ${way} the tokens made with a revoked token, and those made with them`, async () => {
      const u = await user();
      const stolen = await tokens(u.login.accessToken).createPersonalAccessToken({ name: "stolen" });
      const child = (await tokens(stolen.token).createPersonalAccessToken({ name: "laundered" })).token;
      const grandchild = (await tokens(child).createApiKey({ name: "laundered again" })).key;
      const sibling = (await tokens(u.login.accessToken).createApiKey({ name: "the owner's own" })).key;
      for (const t of [stolen.token, child, grandchild, sibling]) expect(await outcome(t)).toBe("ok");
      if (way === "RevokePersonalAccessToken")
        await tokens(u.login.accessToken).revokePersonalAccessToken({ id: stolen.id });
      else expect(await oauthRevoke(stolen.token)).toBe(200);
      expect(await outcome(stolen.token)).toBe("TOKEN_REVOKED");
      expect(await outcome(child), "a token made with the revoked one").toBe("TOKEN_REVOKED");
      expect(await outcome(grandchild), "a token made with one made with it").toBe("TOKEN_REVOKED");
      expect(await outcome(sibling), "a token made with the session").toBe("ok");
      expect(await outcome(u.login.accessToken)).toBe("ok");
    });

  const makerNames: Record<Maker, string> = {
    session: "session's access token",
    pat: "personal access token",
    basic: "password (HTTP Basic)",
  };

  for (const { name, makers, end, after } of ends)
    for (const maker of makers)
      for (const kind of ["personal access token", "API key"] as const)
        it(`makes no ${kind} with a ${makerNames[maker]} that outlives ${name} committed meanwhile`, async () => {
          const u = await user();
          let credential = u.login.accessToken;
          let patId: string | undefined;
          if (maker === "pat") {
            const made = await tokens(u.login.accessToken).createPersonalAccessToken({ name: "maker" });
            credential = made.token;
            patId = made.id;
          }
          // HTTP Basic: the password itself, in the user's tenant.
          const maker_ =
            maker === "basic"
              ? createClient(
                  TokenService,
                  withHeaders(ts.connect(), basic(`${u.tenantId}/${u.username}`, PASSWORD)),
                )
              : tokens(credential);
          expect(await outcome(credential)).toBe("ok");
          const release = onNextCreation(u.id, () =>
            end(u, { pat: credential, ...(patId ? { patId } : {}) }),
          );
          let made: string | ConnectError;
          try {
            made = await (kind === "API key"
              ? maker_.createApiKey({ name: "made meanwhile" }).then((r) => r.key)
              : maker_.createPersonalAccessToken({ name: "made meanwhile" }).then((r) => r.token)
            ).catch((e: unknown) => ConnectError.from(e));
          } finally {
            expect(release(), "the end ran while the credential was made").toBe(true);
          }
          await after?.(u);
          if (typeof made === "string")
            expect(await outcome(made), `a ${kind} made meanwhile outlived ${name}`).not.toBe("ok");
          expect(made).toBeInstanceOf(ConnectError);
          expect((await rejection(Promise.reject(made))).reason).toBe("TOKEN_REVOKED");
        });
});

/**
 * RotateMachineUserCredentials with no grace period ends the previous credentials and the
 * access tokens they obtained (the cut-off: tokens with `iat` up to the rotation's second).
 * A token the previous credential obtains while the rotation hashes the new secret, or
 * signed after a rotation that committed since the credential authenticated, bears a later
 * second: it lived out its whole lifetime, although its credential was gone. Both
 * interleavings are forced: the rotation's credential-creation count (after it read the
 * clock, before its hash) and the token's signature are hooked, and the test's clock is
 * pinned so that the second changes where the hook says.
 */
describe.each(DATABASES)(
  "machine access tokens against a rotation that ends their credential ($name)",
  (db) => {
    let ts: TestServer;
    let root: string;
    const clock = pinnableClock();

    beforeAll(async () => {
      ts = await startTestServer(db, { rateLimit: { enabled: true } }, undefined, { clock: clock.now });
      root = await adminLogin(ts.connect());
    });
    afterAll(async () => {
      await ts?.close();
    });
    afterEach(() => clock.release());

    const outcome = (token: string) => machineOutcome(ts.connect(), token);

    it("ends a token the previous credential obtained while the rotation hashed the new secret", async () => {
      const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
      const second = aSecondAhead();
      clock.pin(second);
      const limiter = ts.app.limits!.credentialCreations;
      const consume = limiter.consume.bind(limiter);
      let obtained: string | undefined;
      limiter.consume = async (key: string) => {
        limiter.consume = consume;
        clock.pin(second + 1000);
        obtained = (await clients(ts.connect(), credential).machines.issueAccessToken({})).accessToken;
        return consume(key);
      };
      try {
        await clients(ts.connect(), root).machines.rotateMachineUserCredentials({ id: machine.id });
      } finally {
        limiter.consume = consume;
      }
      expect(obtained, "the previous credential obtained a token during the rotation").toBeDefined();
      expect(await outcome(credential)).not.toBe("ok");
      expect(await outcome(obtained!), "a token of the previous credential outlived the rotation").toBe(
        "TOKEN_REVOKED",
      );
    });

    it("issues no token signed after a rotation that committed since its credential authenticated", async () => {
      const { machine, token: credential } = await bearerMachine(ts.connect(), root, []);
      const second = aSecondAhead();
      clock.pin(second);
      const { outcome: made, ran: rotated } = await signingAfter(
        ts,
        machine.id,
        async () => {
          await clients(ts.connect(), root).machines.rotateMachineUserCredentials({ id: machine.id });
          clock.pin(second + 1000);
        },
        () => issueOutcome(ts.connect(), credential),
      );
      expect(rotated).toBe(true);
      if (typeof made === "string")
        expect(
          await outcome(made),
          "a token signed after its credential was rotated away authenticated",
        ).not.toBe("ok");
      expect(made).toBeInstanceOf(ConnectError);
      expect((await rejection(Promise.reject(made))).reason).toBe("TOKEN_REVOKED");
    });
  },
);
