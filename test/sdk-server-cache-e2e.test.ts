import { join } from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { createTesseraAuth, type TesseraAuth, TesseraAuthError } from "../src/sdk/server/index.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short, verifierMachine } from "./machine-fixtures.js";

/**
 * The SDK's positive cache against a real Tessera over TLS, its bounds counted where the
 * calls land: Tessera's own `tessera_rpc_requests_total` for VerificationService.
 * VerifyCredential (not the SDK's counter). With the revocation stream up, `cache.max`
 * bounds what is spared, `cache: false` sends every call, and an answer is not served past
 * its credential's expiry however long the ttl. test/sdk-server-cache.test.ts has the same
 * bounds on a manual clock.
 */

describe.each(DATABASES)("the SDK's VerifyCredential cache against Tessera on $name", (db) => {
  let ts: TestServer;
  let verifierToken: string;
  let tenantId: string;
  let root: string;
  const cores: TesseraAuth[] = [];

  /** VerifyCredential calls Tessera has answered so far, every protocol and code. */
  async function verifyCalls(): Promise<number> {
    const text = await ts.app.metrics!.scrape();
    let total = 0;
    for (const line of text.split("\n"))
      if (
        line.startsWith("tessera_rpc_requests_total{") &&
        line.includes('service="tessera.v1.VerificationService"') &&
        line.includes('method="VerifyCredential"')
      )
        total += Number(line.slice(line.lastIndexOf(" ") + 1));
    return total;
  }

  /** A core following WatchRevocations, as a downstream service runs it, ready to use its cache. */
  async function core(
    cache: { max?: number; ttlSeconds?: number } | false,
    now?: () => number,
  ): Promise<TesseraAuth> {
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifierToken,
      cache,
      ...(now ? { now } : {}),
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    return auth;
  }

  async function machineTokens(n: number): Promise<string[]> {
    const admin = clients(ts.connect(), root);
    const out: string[] = [];
    for (let i = 0; i < n; i++)
      out.push(
        (
          await admin.machines.createMachineUser({
            tenantId,
            name: `cached-${short()}`,
            authType: MachineAuthType.BEARER,
            scopes: ["workflows:read"],
          })
        ).token,
      );
    return out;
  }

  beforeAll(async () => {
    ts = await startTestServer(db);
    expect(ts.app.metrics, "the test servers count calls (TESSERA_METRICS_LISTEN)").toBeDefined();
    root = await adminLogin(ts.connect());
    const admin = clients(ts.connect(), root);
    tenantId = (await admin.tenants.createTenant({ name: `cache-${short()}` })).tenant!.id;
    verifierToken = await verifierMachine(ts.connect(), root, tenantId);
  }, 120_000);

  afterEach(() => {
    for (const c of cores.splice(0)) c.close();
  });

  afterAll(async () => {
    await ts?.close();
  });

  it("spares Tessera only the cache.max most recently used credentials", async () => {
    const [a, b, c] = (await machineTokens(3)) as [string, string, string];
    const auth = await core({ max: 2 });
    const start = await verifyCalls();
    const call = (t: string) => auth.authenticate(`Bearer ${t}`);
    await call(a);
    await call(b);
    await call(a);
    await call(b);
    expect(await verifyCalls()).toBe(start + 2);
    await call(c); // a, the least recently used, goes
    expect(auth.stats().cacheSize).toBe(2);
    await call(b);
    await call(c);
    expect(await verifyCalls()).toBe(start + 3);
    await call(a);
    expect(await verifyCalls()).toBe(start + 4);
    expect(auth.stats()).toMatchObject({ cacheSize: 2, verifyCalls: 4, cacheHits: 4 });
    expect(auth.watching()).toBe(true);
  });

  it("asks Tessera on every call with cache: false, the revocation stream up", async () => {
    const [a] = (await machineTokens(1)) as [string];
    const auth = await core(false);
    const start = await verifyCalls();
    for (let i = 0; i < 5; i++) await auth.authenticate(`Bearer ${a}`);
    expect(await verifyCalls()).toBe(start + 5);
    expect(auth.stats()).toMatchObject({ cacheSize: 0, cacheHits: 0 });
    // The same credential through a default core: asked once.
    const cached = await core({});
    const again = await verifyCalls();
    for (let i = 0; i < 5; i++) await cached.authenticate(`Bearer ${a}`);
    expect(await verifyCalls()).toBe(again + 1);
  });

  it("asks again once an answer is ttlSeconds old", async () => {
    const [a] = (await machineTokens(1)) as [string];
    // The cache's clock, moved past the ttl instead of waiting for it.
    let skew = 0;
    const auth = await core({ ttlSeconds: 1 }, () => Date.now() + skew);
    const start = await verifyCalls();
    await auth.authenticate(`Bearer ${a}`);
    await auth.authenticate(`Bearer ${a}`);
    expect(await verifyCalls()).toBe(start + 1);
    skew = 1_100;
    await auth.authenticate(`Bearer ${a}`);
    expect(await verifyCalls()).toBe(start + 2);
    expect(auth.watching()).toBe(true);
  });

  it("does not admit a personal access token from the cache once it has expired, whatever the ttl", async () => {
    const admin = clients(ts.connect(), root);
    const username = `carol-${short()}`;
    await admin.users.createUser({
      username,
      password: "carol password long",
      scopes: ["workflows:read"],
      tenantId,
    });
    const login = await createClient(UserService, ts.connect()).login({
      username,
      password: "carol password long",
      tenant: tenantId,
    });
    // The core first (its stream up), so that the token's short life is spent only on the
    // two calls below: at least 2 s of it, even if its expiry is cut to the whole second.
    const auth = await core({ ttlSeconds: 3600 });
    const expiresAt = Math.ceil(Date.now() / 1000) * 1000 + 3000;
    const pat = await clientFor(TokenService, ts.connect(), login.accessToken).createPersonalAccessToken({
      name: "short-lived",
      expiresAt: timestampFromMs(expiresAt),
    });
    const start = await verifyCalls();
    const p = await auth.authenticate(`Bearer ${pat.token}`);
    // Tessera's answer carries the expiry (whole seconds at most later than asked).
    expect(p.expiresAt!.getTime()).toBeGreaterThan(expiresAt - 1000);
    expect(p.expiresAt!.getTime()).toBeLessThanOrEqual(expiresAt);
    await auth.authenticate(`Bearer ${pat.token}`);
    expect(await verifyCalls()).toBe(start + 1);
    await new Promise((r) => setTimeout(r, Math.max(0, p.expiresAt!.getTime() - Date.now()) + 50));
    const err = await auth.authenticate(`Bearer ${pat.token}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TesseraAuthError);
    expect((err as TesseraAuthError).reason).toBe("TOKEN_EXPIRED");
    expect(await verifyCalls()).toBe(start + 2);
    expect(auth.watching()).toBe(true);
  });
});
