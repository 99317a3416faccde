import { timestampMs } from "@bufbuild/protobuf/wkt";
import { createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { VerificationCode, VerificationService } from "../gen/tessera/v1/verification_service_pb.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, bearerMachine, clients, short } from "./machine-fixtures.js";

/**
 * GetCurrentUser's and VerifyCredential's answers are made once per frozen principal (and
 * user row, and verdict), and encoded once per encoding (services/user/current-user.ts,
 * services/verification/verification-service.ts, transport/frozen-answers.ts): every change
 * to the rows or to the principal must still be in the very next answer, over every protocol
 * and encoding, whichever credential asks. Each case warms the kept answer first (two calls),
 * so an answer or an encoding kept past a change shows up as the old value.
 */

const PASSWORD = "current user answers password";

describe.each(DATABASES)("kept answers ($name)", (db) => {
  let ts: TestServer;
  /** A machine user of the default tenant holding auth:verify: VerifyCredential's caller. */
  let verifierToken: string;
  let root: ReturnType<typeof clients>;

  beforeAll(async () => {
    ts = await startTestServer(db);
    const admin = await adminLogin(ts.connect());
    root = clients(ts.connect(), admin);
    verifierToken = (await bearerMachine(ts.connect(), admin, [], { scopes: ["auth:verify"] })).token;
  });
  afterAll(async () => {
    await ts.close();
  });

  /** Every protocol and encoding the unary handlers serve. */
  function transports(): [string, Transport][] {
    const url = ts.server.url;
    const ca = ts.certs.ca;
    return [
      ["Connect JSON", ts.connect()],
      [
        "Connect binary",
        createConnectTransport({
          baseUrl: url,
          httpVersion: "2",
          useBinaryFormat: true,
          nodeOptions: { ca },
        }),
      ],
      ["gRPC", ts.grpc()],
      ["gRPC-Web", createGrpcWebTransport({ baseUrl: url, httpVersion: "2", nodeOptions: { ca } })],
    ];
  }

  /** A user with an access token and a personal access token. */
  async function user() {
    const username = `cu-${short()}`;
    const { user } = await root.users.createUser({
      username,
      password: PASSWORD,
      scopes: ["cluster:read", "cluster:write"],
    });
    const jwt = (await createClient(UserService, ts.connect()).login({ username, password: PASSWORD }))
      .accessToken;
    const pat = (await clientFor(TokenService, ts.connect(), jwt).createPersonalAccessToken({ name: "cu" }))
      .token;
    return { id: user!.id, jwt, pat };
  }

  /** What each protocol answers each credential, asked twice: every answer must be `expected`. */
  async function expectAnswers(
    u: Awaited<ReturnType<typeof user>>,
    expected: { username: string; createdAtMs: number; permissions: string[] },
  ) {
    for (const [name, transport] of transports()) {
      for (const [how, token] of [
        ["jwt", u.jwt],
        ["pat", u.pat],
      ] as const) {
        for (let i = 0; i < 2; i++) {
          const me = await clientFor(UserService, transport, token).getCurrentUser({});
          expect({
            via: `${name} ${how}`,
            id: me.id,
            username: me.username,
            createdAtMs: me.createdAt ? timestampMs(me.createdAt) : null,
            permissions: me.permissions,
          }).toEqual({ via: `${name} ${how}`, id: u.id, ...expected });
        }
      }
    }
  }

  it("answers a row changed behind the API with the new row on the next call", async () => {
    const u = await user();
    const [row] = await ts.app.sql.all<{ username: string }>("select username from users where id = ?", [
      u.id,
    ]);
    const before = await clientFor(UserService, ts.connect(), u.jwt).getCurrentUser({});
    const permissions = ["cluster:read", "cluster:write"];
    await expectAnswers(u, {
      username: row!.username,
      createdAtMs: timestampMs(before.createdAt!),
      permissions,
    });

    const renamed = `cu-${short()}`;
    const createdAt = new Date(Date.UTC(2026, 0, 2, 3, 4, 5, 678));
    await ts.app.sql.run("update users set username = ?, created_at = ? where id = ?", [
      renamed,
      createdAt,
      u.id,
    ]);
    await expectAnswers(u, { username: renamed, createdAtMs: createdAt.getTime(), permissions });
  });

  it("answers a scope change made through the API with the new permissions on the next call", async () => {
    const u = await user();
    const first = await clientFor(UserService, ts.connect(), u.jwt).getCurrentUser({});
    const expected = { username: first.username, createdAtMs: timestampMs(first.createdAt!) };
    await expectAnswers(u, { ...expected, permissions: ["cluster:read", "cluster:write"] });
    await root.users.updateUser({ id: u.id, scopes: { scopes: ["cluster:read"] } });
    await expectAnswers(u, { ...expected, permissions: ["cluster:read"] });
  });

  /** What each protocol answers verifying each credential of `u`, asked twice: every answer must be `expected`. */
  async function expectVerifications(
    u: Awaited<ReturnType<typeof user>>,
    requiredScopes: string[],
    expected: { code: string; scopes: string[]; patExpiresAtMs: number | null },
  ) {
    for (const [name, transport] of transports()) {
      const verifier = clientFor(VerificationService, transport, verifierToken);
      for (const [how, token] of [
        ["jwt", u.jwt],
        ["pat", u.pat],
      ] as const) {
        for (let i = 0; i < 2; i++) {
          const v = await verifier.verifyCredential({ credential: token, requiredScopes });
          const got = {
            via: `${name} ${how}`,
            code: VerificationCode[v.code],
            principalId: v.principalId,
            scopes: v.scopes,
            expiresAtMs: v.expiresAt ? timestampMs(v.expiresAt) : null,
          };
          // A JWT's expiry is its own (not a row's): only the token's row is checked here.
          if (how === "jwt") got.expiresAtMs = null;
          expect(got).toEqual({
            via: `${name} ${how}`,
            code: expected.code,
            principalId: u.id,
            scopes: expected.scopes,
            expiresAtMs: how === "pat" ? expected.patExpiresAtMs : null,
          });
        }
      }
    }
  }

  it("verifies a credential whose rows changed with the new rows on the next call", async () => {
    const u = await user();
    const both = ["cluster:read", "cluster:write"];
    await expectVerifications(u, [], { code: "VALID", scopes: both, patExpiresAtMs: null });
    await expectVerifications(u, ["cluster:write"], { code: "VALID", scopes: both, patExpiresAtMs: null });
    const expiresAt = new Date(Date.now() + 86_400_000);
    expiresAt.setUTCMilliseconds(0);
    await ts.app.sql.run("update api_tokens set expires_at = ? where owner_user_id = ?", [expiresAt, u.id]);
    await expectVerifications(u, [], { code: "VALID", scopes: both, patExpiresAtMs: expiresAt.getTime() });
    await root.users.updateUser({ id: u.id, scopes: { scopes: ["cluster:read"] } });
    const read = ["cluster:read"];
    await expectVerifications(u, [], { code: "VALID", scopes: read, patExpiresAtMs: expiresAt.getTime() });
    await expectVerifications(u, ["cluster:write"], {
      code: "INSUFFICIENT_SCOPES",
      scopes: read,
      patExpiresAtMs: expiresAt.getTime(),
    });
  });
});
