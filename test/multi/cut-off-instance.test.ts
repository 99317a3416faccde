import { Code, createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { DbProxy } from "../db-proxy.js";
import { outcome, rejection } from "../errors-util.js";
import {
  clientFor,
  createTestCerts,
  dropSchema,
  startTestServer,
  type TestCerts,
  type TestDatabase,
  type TestServer,
} from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * An instance cut off from PostgreSQL without a reset (packets dropped: a partition, a
 * stalled host on the way) still believes its listening session alive until its keepalive
 * times out. Another instance's write meanwhile waits for its acknowledgement up to the
 * barrier's bound, ends its session (which it cannot hear) and returns: the cut-off
 * instance must not answer from its cache from then on. Its cache is trusted only for
 * `database.barrierTimeoutMs` after the last query its listening session answered was
 * sent, so by the time the writer's barrier gives up, it is off.
 */

const BARRIER_MS = 400;
const PASSWORD = "listener lease password";
const proxySchema = `t_${Date.now().toString(36)}_lease`;
let proxy: DbProxy;
let certs: TestCerts;
let w: TestServer;
let p: TestServer;
let tw: Transport;
let tp: Transport;

const me = (t: Transport, token: string) => clientFor(UserService, t, token).getCurrentUser({});

beforeAll(async () => {
  certs = await createTestCerts();
  proxy = await DbProxy.start();
  const url = proxy.url(proxySchema);
  // W (the writer) reaches PostgreSQL directly, P through the proxy; one schema.
  const direct: TestDatabase = {
    name: "postgres",
    url: () => url.replace(`127.0.0.1:${proxy.port}`, "127.0.0.1:5432"),
  };
  const viaProxy: TestDatabase = { name: "postgres", url: () => url };
  const database = { barrierTimeoutMs: BARRIER_MS, statementTimeoutMs: 1_000 };
  w = await startTestServer(direct, { database }, certs);
  p = await startTestServer(viaProxy, { database }, certs);
  tw = w.connect();
  tp = p.connect();
});

afterAll(async () => {
  proxy?.restore();
  await p?.close();
  await w?.close();
  await proxy?.close();
  await dropSchema(`postgres://postgres@127.0.0.1:5432/test?schema=${proxySchema}`);
});

describe("an instance cut off from PostgreSQL without a reset", () => {
  it("stops answering from its cache once another instance's write has given up waiting for it", async () => {
    const admin = await adminLogin(tw);
    const username = `lease-${short()}`;
    await clients(tw, admin).users.createUser({ username, password: PASSWORD, scopes: ["cluster:read"] });
    const login = await createClient(UserService, tw).login({ username, password: PASSWORD });
    const pat = await clientFor(TokenService, tw, login.accessToken).createPersonalAccessToken({ name: "l" });
    // P answers the PAT from its cache.
    expect(await outcome(me(tp, pat.token))).toBe("ok");
    const before = p.app.sql.cacheStats();
    expect(await outcome(me(tp, pat.token))).toBe("ok");
    expect(p.app.sql.cacheStats().enabled).toBe(true);
    expect(p.app.sql.cacheStats().hits).toBeGreaterThan(before.hits);
    expect(p.app.sql.cacheStats().misses).toBe(before.misses);

    proxy.freeze();
    // W's barrier waits BARRIER_MS for P's acknowledgement, then ends P's listening session
    // (P does not hear of it: the proxy holds every byte) and returns.
    await clientFor(TokenService, tw, login.accessToken).revokePersonalAccessToken({ id: pat.id });
    // P's last answered query was sent before the freeze, more than BARRIER_MS ago.
    expect(p.app.sql.cacheStats().enabled).toBe(false);
    // Not from the cache: the read reaches the frozen database and is given up on.
    expect(await outcome(me(tp, pat.token))).toBe("UNAVAILABLE");

    proxy.restore();
    expect(await p.app.notifier!.whenOnline(20_000)).toBe(true);
    expect(await outcome(me(tp, pat.token))).toBe("TOKEN_REVOKED");
  });
});

describe("an instance cut off from PostgreSQL when another rotates the signing key", () => {
  it("answers a token of the key it cannot read Unavailable with Retry-After, not TOKEN_INVALID", async () => {
    const admin = await adminLogin(tw);
    const username = `keys-${short()}`;
    await clients(tw, admin).users.createUser({ username, password: PASSWORD, scopes: ["cluster:read"] });
    proxy.cut();
    await expect.poll(() => p.app.notifier!.online).toBe(false);
    // An emergency rotation on W: P cannot hear of the new key, nor read it.
    const rotated = await w.app.jwt.rotate({ immediate: true });
    const login = await createClient(UserService, tw).login({ username, password: PASSWORD });
    expect(login.accessToken.length).toBeGreaterThan(0);
    expect(await outcome(me(tw, login.accessToken))).toBe("ok");
    const refused = await rejection(me(tp, login.accessToken));
    // A fault of P's, to retry: the token may well be good (the client must not drop it).
    expect(refused.code).toBe(Code.Unavailable);
    expect(refused.error.metadata.get("retry-after")).toMatch(/^\d+$/);

    proxy.restore();
    expect(await p.app.notifier!.whenOnline(20_000)).toBe(true);
    await expect.poll(() => p.app.jwt.jwks().keys.some((k) => k.kid === rotated!.kid)).toBe(true);
    expect(await outcome(me(tp, login.accessToken))).toBe("ok");
  });
});
