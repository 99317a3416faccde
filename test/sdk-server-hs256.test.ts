import { join } from "node:path";
import {
  Code,
  ConnectError,
  createClient,
  createRouterTransport,
  type HandlerContext,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { SignJWT } from "jose";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import {
  createTesseraAuth,
  createTesseraAuthInterceptor,
  type JwtVerifyMode,
  type TesseraAuth,
  TesseraAuthError,
  type TesseraPrincipal,
  tesseraPrincipalKey,
} from "../src/sdk/server/index.js";
import { clientFor, pinnableClock, SQLITE, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * The SDK's drop-in verification against a Tessera that signs access tokens with HS256
 * (`auth.jwt.secret`): no key in its JWKS, so the default ("auto") verifies such a JWT
 * through VerifyCredential, as an opaque credential — cached while WatchRevocations is up,
 * dropped by the session's events, asked again while the stream is down. A real Tessera
 * over TLS (gRPC, the SDK's own transport); the downstream is UserService.GetCurrentUser
 * served in memory behind the interceptor (its `(tessera.v1.auth)` rule: a user).
 */

const SECRET = "an-hs256-secret-of-the-sdk-downstream-tests-0123";

/** The SDK's transport to Tessera, whose WatchRevocations streams the test can break and keep down. */
function cuttableStreams(inner: Transport) {
  const live = new Set<AbortController>();
  let down = false;
  const transport: Transport = {
    unary: inner.unary.bind(inner),
    stream(method, signal, timeoutMs, header, input, contextValues) {
      if (down) return Promise.reject(new ConnectError("stream cut by the test", Code.Unavailable));
      const cut = new AbortController();
      live.add(cut);
      const both = signal ? AbortSignal.any([signal, cut.signal]) : cut.signal;
      return inner.stream(method, both, timeoutMs, header, input, contextValues);
    },
  };
  return {
    transport,
    cut() {
      down = true;
      for (const c of live) c.abort();
      live.clear();
    },
    restore() {
      down = false;
    },
  };
}

/**
 * A real Tessera over TLS signing with `alg` (`jwt`: its `auth.jwt` config), a tenant and a
 * service of it holding `auth:verify`; the hooks are those of the calling describe.
 */
function deployment(jwt: Record<string, unknown>, alg: "HS256" | "EdDSA") {
  const env = {} as { ts: TestServer; tenantId: string };
  let verifier: string;
  const clock = pinnableClock();
  const cores: TesseraAuth[] = [];
  const seen: (TesseraPrincipal | undefined)[] = [];

  beforeAll(async () => {
    env.ts = await startTestServer(SQLITE, { auth: { jwt } }, undefined, { clock: clock.now });
    const ts = env.ts;
    const root = clients(ts.connect(), await adminLogin(ts.connect()));
    env.tenantId = (await root.tenants.createTenant({ name: `${alg}-${short()}` })).tenant!.id;
    const tenantId = env.tenantId;
    verifier = (
      await root.machines.createMachineUser({
        tenantId,
        name: `${alg}-service-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
  }, 120_000);

  afterEach(() => {
    clock.release();
    for (const c of cores.splice(0)) c.close();
  });

  afterAll(async () => {
    await env.ts?.close();
  });

  /** A user of `tenant` logged in: its access token (signed `alg`), refresh token and id. */
  async function login(tenant = env.tenantId) {
    const { ts } = env;
    const root = clients(ts.connect(), await adminLogin(ts.connect()));
    const username = `${alg}-${short()}`;
    const password = "hs256 user password";
    const id = (
      await root.users.createUser({ username, password, scopes: ["things:read"], tenantId: tenant })
    ).user!.id;
    const res = await createClient(UserService, ts.connect()).login({ username, password, tenant });
    expect(JSON.parse(Buffer.from(res.accessToken.split(".")[0]!, "base64url").toString())).toMatchObject({
      alg,
    });
    return { id, token: res.accessToken, refresh: res.refreshToken };
  }

  /** A downstream service behind the interceptor on a core of its own, and a client of it. */
  async function downstream(
    opts: { verify?: JwtVerifyMode; transport?: Transport; now?: () => number; watch?: boolean } = {},
  ) {
    const { ts } = env;
    const auth = createTesseraAuth({
      server: ts.server.url,
      // The JWKS fetched over TLS too (node:https, this CA).
      caFile: join(ts.certs.dir, "ca.crt"),
      transport:
        opts.transport ?? createGrpcTransport({ baseUrl: ts.server.url, nodeOptions: { ca: ts.certs.ca } }),
      credential: verifier,
      ...(opts.verify ? { jwt: { verify: opts.verify } } : {}),
      ...(opts.now ? { now: opts.now } : {}),
      ...(opts.watch === false ? { watch: false } : {}),
    });
    cores.push(auth);
    if (opts.watch !== false) expect(await auth.ready(10_000)).toBe(true);
    const routes = createRouterTransport(
      ({ service }) =>
        service(UserService, {
          getCurrentUser(_req: unknown, ctx: HandlerContext) {
            seen.push(ctx.values.get(tesseraPrincipalKey));
            return {};
          },
        } as never),
      { router: { interceptors: [createTesseraAuthInterceptor(auth)] } },
    );
    const client = createClient(UserService, routes);
    /** GetCurrentUser with `token`: the principal the handler saw, or the refusal's code and reason. */
    const call = async (token: string) => {
      const before = seen.length;
      try {
        await client.getCurrentUser({}, { headers: { authorization: `Bearer ${token}` } });
        expect(seen.length).toBe(before + 1);
        return { principal: seen.at(-1) };
      } catch (err) {
        expect(seen.length, "a refused call never reaches the handler").toBe(before);
        const e = ConnectError.from(err);
        return { code: e.code, reason: e.findDetails(ErrorInfoSchema)[0]?.reason };
      }
    };
    return { auth, call };
  }

  return { env, clock, login, downstream };
}

describe("the SDK against a Tessera signing HS256 (sqlite)", () => {
  const { env, clock, login, downstream } = deployment({ secret: SECRET }, "HS256");

  it("admits an HS256 access token downstream through VerifyCredential, then from the cache", async () => {
    const user = await login();
    const { auth, call } = await downstream();
    const sid = JSON.parse(Buffer.from(user.token.split(".")[1]!, "base64url").toString()).sid as string;
    expect((await call(user.token)).principal).toMatchObject({
      id: user.id,
      kind: "user",
      tenantId: env.tenantId,
      credentialKind: "jwt",
      sessionId: sid,
      scopes: ["things:read"],
    });
    await call(user.token);
    await call(user.token);
    // The JWKS fetched once, as for an offline token: empty, so HS256 is verified by Tessera.
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, offlineJwts: 0, jwksFetches: 1 });
  });

  it("refuses the token on the next call once its session is logged out (the cached answer dropped)", async () => {
    const user = await login();
    const { auth, call } = await downstream();
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheSize: 1 });
    const events = auth.stats().watch!.events;
    await clientFor(UserService, env.ts.connect(), user.token).logout({ refreshToken: user.refresh });
    await expect.poll(() => auth.stats().watch!.events).toBeGreaterThan(events);
    expect(auth.stats().cacheSize).toBe(0);
    expect(await call(user.token)).toEqual({ code: Code.Unauthenticated, reason: "TOKEN_REVOKED" });
    expect(auth.stats().verifyCalls).toBe(2);
    expect(auth.watching()).toBe(true);
  });

  it("refuses the token on the next call once its user is disabled (the subject's event drops the answer)", async () => {
    const user = await login();
    const { auth, call } = await downstream();
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheSize: 1 });
    const events = auth.stats().watch!.events;
    const root = clients(env.ts.connect(), await adminLogin(env.ts.connect()));
    await root.users.updateUser({ id: user.id, disabled: true });
    await expect.poll(() => auth.stats().watch!.events).toBeGreaterThan(events);
    expect(auth.stats().cacheSize).toBe(0);
    const refused = await call(user.token);
    expect(refused.code).toBe(Code.Unauthenticated);
    expect(refused.reason).toBe("PRINCIPAL_DISABLED");
    expect(auth.stats().verifyCalls).toBe(2);
  });

  it("refuses an expired HS256 token, even one admitted and cached before", async () => {
    const user = await login();
    let offset = 0;
    const { auth, call } = await downstream({ now: () => Date.now() + offset });
    expect((await call(user.token)).principal?.id).toBe(user.id);
    const exp =
      (JSON.parse(Buffer.from(user.token.split(".")[1]!, "base64url").toString()).exp as number) * 1000;
    // Both clocks at the token's expiry: Tessera's and the downstream's.
    clock.pin(exp);
    offset = exp - Date.now();
    expect(await call(user.token)).toEqual({ code: Code.Unauthenticated, reason: "TOKEN_EXPIRED" });
    expect(auth.stats().verifyCalls).toBe(2);
  });

  it("with the watch stream down, serves no cached answer: a session logged out meanwhile is refused", async () => {
    const user = await login();
    const streams = cuttableStreams(
      createGrpcTransport({ baseUrl: env.ts.server.url, nodeOptions: { ca: env.ts.certs.ca } }),
    );
    const { auth, call } = await downstream({ transport: streams.transport });
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, cacheSize: 1 });
    streams.cut();
    await expect.poll(() => auth.watching()).toBe(false);
    expect(auth.stats().cacheSize).toBe(0);
    // Asked again while the stream is down, and not remembered.
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect(auth.stats()).toMatchObject({ verifyCalls: 2, cacheSize: 0 });
    // The revocation's event cannot arrive: Tessera's answer refuses the token.
    await clientFor(UserService, env.ts.connect(), user.token).logout({ refreshToken: user.refresh });
    expect(await call(user.token)).toEqual({ code: Code.Unauthenticated, reason: "TOKEN_REVOKED" });
    expect(auth.stats().verifyCalls).toBe(3);
    streams.restore();
  });

  it("refuses an HS256 token signed with another secret, a tampered one, and another tenant's", async () => {
    const user = await login();
    const { auth, call } = await downstream();
    const claims = JSON.parse(Buffer.from(user.token.split(".")[1]!, "base64url").toString()) as Record<
      string,
      unknown
    >;
    const forged = await new SignJWT(claims)
      .setProtectedHeader({ alg: "HS256", kid: "hs256", typ: "at+jwt" })
      .sign(new TextEncoder().encode(`${SECRET}-but-not-quite`));
    const [h, p] = user.token.split(".") as [string, string];
    const raised = `${h}.${Buffer.from(JSON.stringify({ ...claims, scope: "things:read admin:tenants" })).toString("base64url")}.${user.token.split(".")[2]}`;
    for (const token of [forged, raised, `${h}.${p}.`.concat("A".repeat(43))])
      expect(await call(token), token.slice(-12)).toEqual({
        code: Code.Unauthenticated,
        reason: "CREDENTIALS_INVALID",
      });
    // A genuine token of a tenant the service may not see: behind Tessera's tenant wall.
    const root = clients(env.ts.connect(), await adminLogin(env.ts.connect()));
    const other = (await root.tenants.createTenant({ name: `hs256-other-${short()}` })).tenant!.id;
    const stranger = await login(other);
    expect(await call(stranger.token)).toEqual({ code: Code.Unauthenticated, reason: "CREDENTIALS_INVALID" });
    expect(auth.stats()).toMatchObject({ verifyCalls: 4, cacheSize: 0 });
    // The genuine token still passes.
    expect((await call(user.token)).principal?.id).toBe(user.id);
  });

  it('refuses every HS256 token with jwt.verify "offline", without asking Tessera', async () => {
    const user = await login();
    const { auth, call } = await downstream({ verify: "offline" });
    expect(await call(user.token)).toEqual({ code: Code.Unauthenticated, reason: "TOKEN_INVALID" });
    expect(auth.stats().verifyCalls).toBe(0);
  });

  it("without the watch, asks Tessera on every call: the core refuses the token right after logout", async () => {
    const user = await login();
    const { auth } = await downstream({ watch: false });
    expect((await auth.authenticate(`Bearer ${user.token}`)).id).toBe(user.id);
    await clientFor(UserService, env.ts.connect(), user.token).logout({ refreshToken: user.refresh });
    const err = await auth.authenticate(`Bearer ${user.token}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TesseraAuthError);
    expect((err as TesseraAuthError).reason).toBe("TOKEN_REVOKED");
  });
});

describe("the SDK against a Tessera signing EdDSA (sqlite)", () => {
  const { login, downstream } = deployment({ algorithm: "EdDSA" }, "EdDSA");

  it('in "auto", refuses forged HS256 tokens offline: none costs a VerifyCredential call', async () => {
    const user = await login();
    const { auth, call } = await downstream();
    const claims = JSON.parse(Buffer.from(user.token.split(".")[1]!, "base64url").toString()) as Record<
      string,
      unknown
    >;
    const kid = JSON.parse(Buffer.from(user.token.split(".")[0]!, "base64url").toString()).kid as string;
    // What an attacker sends at will: the header is theirs, so is the secret; each token new.
    for (let i = 0; i < 20; i++) {
      const forged = await new SignJWT({ ...claims, jti: `forged-${i}` })
        .setProtectedHeader({ alg: "HS256", kid: i % 2 === 0 ? "hs256" : kid, typ: "at+jwt" })
        .sign(new TextEncoder().encode(`attacker-secret-${i}-0123456789abcdef0123`));
      expect(await call(forged), `forged ${i}`).toEqual({
        code: Code.Unauthenticated,
        reason: "TOKEN_INVALID",
      });
    }
    expect(auth.stats()).toMatchObject({ verifyCalls: 0, jwksFetches: 1 });
    // The genuine token passes the offline checks, then (issued before this service's watch
    // began) Tessera's, once: its answer is cached.
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect((await call(user.token)).principal?.id).toBe(user.id);
    expect(auth.stats()).toMatchObject({ verifyCalls: 1, jwksFetches: 1 });
  });
});
