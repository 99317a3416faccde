import { join } from "node:path";
import { createClient, type Transport } from "@connectrpc/connect";
import { Agent, request } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationCode, VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuth, type TesseraAuth } from "../../src/sdk/server/index.js";
import { outcome } from "../errors-util.js";
import { clientFor, POSTGRES, type TestDatabase, withHeaders } from "../helpers.js";
import {
  basic,
  clients,
  connectedWithCertificate,
  mintClientCertificate,
  short,
} from "../machine-fixtures.js";
import { mintBackend } from "../security/fixtures.js";
import { splitTransport } from "../watch-fixtures.js";
import { type Instances, startInstances, stopInstances } from "./fixtures.js";

/**
 * The revocation matrix across two instances on one PostgreSQL schema: for every kind of
 * credential and every action that ends it, done on one instance, the very next request on
 * the other (no wait) refuses it three ways: an authenticated RPC presenting it,
 * VerifyCredential (not valid, with the action's code) and /oauth2/introspect
 * (`active: false`). The instance revoking is the `tessera serve` process; the one checked
 * runs in this process, so the test sees that its state cache answered the warm-up calls
 * (a missed invalidation would be served from there).
 */

const PASSWORD = "revocation matrix password";
const url = POSTGRES.url();
const db: TestDatabase = { name: "postgres", url: () => url };
let m: Instances;
let agent: Agent;
/** A transport to the checked instance, kept for the whole file as a client keeps its connection. */
let checked: Transport;

type Action =
  | "revoke"
  | "logout"
  | "disable"
  | "delete"
  | "tenant"
  | "rotate"
  | "unbind"
  | "takeover"
  | "contest"
  | "password"
  | "reset"
  | "revokeTokens";

/** A credential made for one cell, and what ends it. */
interface Held {
  /** An authenticated call presenting the credential to the checked instance. */
  use(): Promise<unknown>;
  /** The credential as VerifyCredential and /oauth2/introspect take it (none for refresh tokens and certificates). */
  presented?: string;
  /** RFC 8705 `x5t#S256` of the certificate a bound credential is presented with (a service is given it too). */
  thumbprint?: string;
  /** Each action, done on the revoking instance. */
  acts: Partial<Record<Action, () => Promise<unknown>>>;
  /** Whether warm-up calls are answered from the state cache (a refresh writes its session). */
  cached: boolean;
  close?(): Promise<void>;
}

/** VerifyCredential's code after each action (a kind may answer otherwise: its `codes`). */
const VERIFY_CODE: Record<Action, string> = {
  revoke: "REVOKED",
  logout: "REVOKED",
  disable: "DISABLED",
  delete: "REVOKED",
  tenant: "TENANT_DISABLED",
  rotate: "REVOKED",
  unbind: "REVOKED",
  takeover: "REVOKED",
  contest: "REVOKED",
  password: "REVOKED",
  reset: "REVOKED",
  revokeTokens: "REVOKED",
};

const revoking = () => m.tb;
const root = () => clients(revoking(), m.root);

/** A form POST to a plain endpoint (OAuth) of the instance at `base`: status and JSON body. */
async function form(
  base: string,
  path: string,
  body: Record<string, string>,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await request(`${base}${path}`, {
    method: "POST",
    dispatcher: agent,
    headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
    body: new URLSearchParams(body).toString(),
  });
  const text = await res.body.text();
  return { status: res.statusCode, json: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

/** A form POST to the revoking instance that must answer 200. */
async function formOk(path: string, body: Record<string, string>, headers: Record<string, string> = {}) {
  const res = await form(m.b.url, path, body, headers);
  expect(res.status, JSON.stringify(res.json)).toBe(200);
  return res.json;
}

/** VerifyCredential's code on the checked instance. */
async function verified(credential: string): Promise<string> {
  const v = clientFor(VerificationService, checked, m.verifier);
  return VerificationCode[(await v.verifyCredential({ credential })).code];
}

/** /oauth2/introspect's answer on the checked instance. */
async function introspected(token: string): Promise<Record<string, unknown>> {
  const res = await form(
    m.a.server.url,
    "/oauth2/introspect",
    { token },
    { authorization: `Bearer ${m.verifier}` },
  );
  expect(res.status).toBe(200);
  return res.json;
}

const me = (token: string) => clientFor(UserService, checked, token).getCurrentUser({});

async function newTenant(): Promise<string> {
  return (await root().tenants.createTenant({ name: `rm-${short()}` })).tenant!.id;
}

/** A user of a tenant of its own, logged in on the revoking instance, and the actions on it. */
async function userSubject() {
  const tenantId = await newTenant();
  const username = `rm-${short()}`;
  const { user } = await root().users.createUser({
    username,
    password: PASSWORD,
    scopes: ["cluster:read"],
    tenantId,
  });
  const login = await createClient(UserService, revoking()).login({
    username,
    password: PASSWORD,
    tenant: tenantId,
  });
  const id = user!.id;
  const acts: Held["acts"] = {
    disable: () => root().users.updateUser({ id, disabled: true }),
    delete: () => root().users.deleteUser({ id }),
    tenant: () => root().tenants.updateTenant({ id: tenantId, disabled: true }),
    password: () =>
      clientFor(UserService, revoking(), login.accessToken).changePassword({
        currentPassword: PASSWORD,
        newPassword: `${PASSWORD} changed`,
        revokeTokens: true,
      }),
    reset: () => root().users.updateUser({ id, password: `${PASSWORD} reset` }),
    revokeTokens: () => root().users.updateUser({ id, revokeTokens: true }),
  };
  return { login, acts, tokens: clientFor(TokenService, revoking(), login.accessToken) };
}

/** A machine user of a tenant of its own, made on the revoking instance, and the actions on it. */
async function machineSubject(authType: MachineAuthType) {
  const tenantId = await newTenant();
  const res = await root().machines.createMachineUser({
    tenantId,
    name: `rm-${short()}`,
    authType,
    scopes: ["cluster:read"],
  });
  const id = res.machineUser!.id;
  const acts: Held["acts"] = {
    disable: () => root().machines.updateMachineUser({ id, disabled: true }),
    delete: () => root().machines.deleteMachineUser({ id }),
    tenant: () => root().tenants.updateTenant({ id: tenantId, disabled: true }),
    // No grace period: the previous credentials stop at once.
    rotate: () => root().machines.rotateMachineUserCredentials({ id }),
  };
  return { id, tenantId, res, acts };
}

const check = (t: Transport, auth: string | Record<string, string>) =>
  clients(t, auth).machines.checkAuthentication({});

/** Each kind of credential: how to make one, and the actions that apply to it. */
const KINDS: Record<
  string,
  { actions: Action[]; codes?: Partial<Record<Action, string>>; make(): Promise<Held> }
> = {
  "user access JWT": {
    actions: ["revoke", "logout", "disable", "delete", "tenant", "password", "reset"],
    async make() {
      const s = await userSubject();
      const jwt = s.login.accessToken;
      return {
        use: () => me(jwt),
        presented: jwt,
        cached: true,
        acts: {
          ...s.acts,
          revoke: () => formOk("/oauth2/revoke", { token: jwt }, { authorization: `Bearer ${jwt}` }),
          logout: () => createClient(UserService, revoking()).logout({ refreshToken: s.login.refreshToken }),
        },
      };
    },
  },
  "refresh token": {
    actions: ["revoke", "logout", "disable", "delete", "tenant", "password", "reset"],
    async make() {
      const s = await userSubject();
      // Each use spends the current refresh token for the next, as a client does.
      let current = s.login.refreshToken;
      return {
        async use() {
          current = (await createClient(UserService, checked).refreshToken({ refreshToken: current }))
            .refreshToken;
        },
        cached: false,
        acts: {
          ...s.acts,
          // RFC 7009 §2.1: a public client signs out with its refresh token alone.
          revoke: () => formOk("/oauth2/revoke", { token: current }),
          logout: () => createClient(UserService, revoking()).logout({ refreshToken: current }),
        },
      };
    },
  },
  "personal access token": {
    // Deleting its user is left out: VerifyCredential answers NOT_FOUND, where the proto says REVOKED.
    actions: ["revoke", "disable", "tenant", "password", "revokeTokens"],
    async make() {
      const s = await userSubject();
      const pat = await s.tokens.createPersonalAccessToken({ name: "rm" });
      return {
        use: () => me(pat.token),
        presented: pat.token,
        cached: true,
        acts: { ...s.acts, revoke: () => s.tokens.revokePersonalAccessToken({ id: pat.id }) },
      };
    },
  },
  "API key (X-API-Key)": {
    // Deleting its user is left out, as for personal access tokens.
    actions: ["revoke", "disable", "tenant", "password", "revokeTokens"],
    async make() {
      const s = await userSubject();
      const key = await s.tokens.createApiKey({ name: "rm" });
      return {
        use: () =>
          createClient(UserService, withHeaders(checked, { "x-api-key": key.key })).getCurrentUser({}),
        presented: key.key,
        cached: true,
        acts: { ...s.acts, revoke: () => s.tokens.revokeApiKey({ id: key.id }) },
      };
    },
  },
  "machine token": {
    // Deleting its machine user is left out, as for personal access tokens.
    actions: ["rotate", "disable", "tenant"],
    // A credential rotated out without a grace period is gone (README, VerifyCredential).
    codes: { rotate: "NOT_FOUND" },
    async make() {
      const s = await machineSubject(MachineAuthType.BEARER);
      return { use: () => check(checked, s.res.token), presented: s.res.token, cached: true, acts: s.acts };
    },
  },
  "machine Basic": {
    // Deleting its machine user is left out, as for personal access tokens.
    actions: ["rotate", "disable", "tenant"],
    // A pair refused reads as a wrong password would, and one rotated out is gone (README, VerifyCredential).
    codes: { rotate: "NOT_FOUND", disable: "NOT_FOUND", tenant: "NOT_FOUND" },
    async make() {
      const s = await machineSubject(MachineAuthType.BASIC);
      const header = basic(s.res.username, s.res.password);
      return {
        use: () => check(checked, header),
        presented: header.authorization!,
        cached: true,
        acts: s.acts,
      };
    },
  },
  "client certificate (binding)": {
    actions: ["unbind", "disable", "delete", "tenant"],
    async make() {
      const s = await machineSubject(MachineAuthType.BEARER);
      // A certificate of its own: a fingerprint is bound to one machine user at a time.
      const pem = await mintClientCertificate(m.a);
      const identity = { case: "sha256Fingerprint" as const, value: pem.fingerprint };
      await root().machines.bindCertificate({ machineUserId: s.id, identity });
      const conn = await connectedWithCertificate(m.a, pem);
      return {
        use: () => conn.client.checkAuthentication({}),
        cached: true,
        acts: {
          ...s.acts,
          unbind: () => root().machines.unbindCertificate({ machineUserId: s.id, identity }),
        },
        close: async () => conn.sessionManager.abort(),
      };
    },
  },
  "access token issued to a client certificate alone": {
    // takeover: the certificate's fingerprint bound to another machine user of its tenant (it
    // then authenticates as that one); contest: a rival SAN URI binding whose binder may not
    // manage the machine user (cluster:read), which then loses that scope, so the rival's
    // binding stands too. Neither revokes anything of the token's machine user.
    actions: ["takeover", "contest", "unbind", "disable", "delete", "tenant"],
    async make() {
      const s = await machineSubject(MachineAuthType.BEARER);
      const [san, rivalSan] = [`spiffe://matrix.example/${short()}`, `spiffe://matrix.example/${short()}`];
      const identity = { case: "sanUri" as const, value: san };
      await root().machines.bindCertificate({ machineUserId: s.id, identity });
      const backend = await mintBackend(m.a, san, rivalSan);
      const conn = await connectedWithCertificate(m.a, backend);
      const token = (await conn.client.issueAccessToken({})).accessToken;
      return {
        use: () => check(conn.transport, token),
        presented: token,
        thumbprint: Buffer.from(backend.fingerprint, "hex").toString("base64url"),
        cached: true,
        acts: {
          ...s.acts,
          unbind: () => root().machines.unbindCertificate({ machineUserId: s.id, identity }),
          async takeover() {
            const other = await root().machines.createMachineUser({
              tenantId: s.tenantId,
              name: `rm-${short()}`,
              authType: MachineAuthType.BEARER,
            });
            await root().machines.bindCertificate({
              machineUserId: other.machineUser!.id,
              identity: { case: "sha256Fingerprint", value: backend.fingerprint },
            });
          },
          async contest() {
            const username = `rm-${short()}`;
            await root().users.createUser({
              username,
              password: PASSWORD,
              scopes: ["admin:machine-users"],
              tenantId: s.tenantId,
            });
            const login = await createClient(UserService, revoking()).login({
              username,
              password: PASSWORD,
              tenant: s.tenantId,
            });
            const binder = clients(revoking(), login.accessToken).machines;
            const rival = await binder.createMachineUser({
              name: `rm-${short()}`,
              authType: MachineAuthType.BEARER,
            });
            await binder.bindCertificate({
              machineUserId: rival.machineUser!.id,
              identity: { case: "sanUri", value: rivalSan },
            });
            await root().machines.updateMachineUser({ id: s.id, scopes: { scopes: [] } });
          },
        },
        close: async () => conn.sessionManager.abort(),
      };
    },
  },
  "OAuth client_credentials access token": {
    actions: ["revoke", "rotate", "disable", "delete", "tenant"],
    async make() {
      const s = await machineSubject(MachineAuthType.BASIC);
      const client = basic(s.res.username, s.res.password);
      const granted = await formOk("/oauth2/token", { grant_type: "client_credentials" }, client);
      const token = granted.access_token as string;
      return {
        use: () => check(checked, token),
        presented: token,
        cached: true,
        acts: { ...s.acts, revoke: () => formOk("/oauth2/revoke", { token }, client) },
      };
    },
  },
};

const CELLS = Object.entries(KINDS).flatMap(([kind, k]) =>
  k.actions.map((action) => [kind, action] as const),
);

beforeAll(async () => {
  m = await startInstances(db, {}, url);
  agent = new Agent({ connect: { ca: m.certs.ca } });
  checked = m.ta;
}, 120_000);

afterAll(async () => {
  await agent?.close();
  await stopInstances(m);
});

describe("the revocation matrix across two PostgreSQL instances", () => {
  it.each(CELLS)("%s, %s on one instance: refused on the other's next request", async (kind, action) => {
    const { make, codes } = KINDS[kind]!;
    const held = await make();
    try {
      // Warm the checked instance: a second round of calls must be served from its cache.
      const round = async () => {
        await held.use();
        if (held.presented !== undefined) {
          expect(await verified(held.presented)).toBe("VALID");
          expect((await introspected(held.presented)).active).toBe(true);
        }
      };
      await round();
      const before = m.a.app.sql.cacheStats();
      await round();
      const after = m.a.app.sql.cacheStats();
      expect(after.enabled).toBe(true);
      if (held.cached) {
        expect(after.hits).toBeGreaterThan(before.hits);
        expect(after.misses).toBe(before.misses);
      }

      await held.acts[action]!();
      // No wait: A's RPC has returned, so every instance must refuse it now.
      const [used, code, introspection] = await Promise.all([
        outcome(held.use(), { withCode: true }),
        held.presented === undefined ? undefined : verified(held.presented),
        held.presented === undefined ? undefined : introspected(held.presented),
      ]);
      expect(used).toMatch(/^Unauthenticated\//);
      if (held.presented !== undefined) {
        expect(code).toBe(codes?.[action] ?? VERIFY_CODE[action]);
        expect(introspection).toEqual({ active: false });
      }
    } finally {
      await held.close?.();
    }
  });
});

/**
 * The same cells through the SDK's core (what createTesseraAuthInterceptor and the middleware
 * run), its revocation watch on the revoking instance and its VerifyCredential calls on the
 * other, as behind a load balancer. Its cache is dropped by the watch's events, which race the
 * revoking RPC's answer: the test waits for the event, then the SDK's next call must be
 * refused, verified anew by the checked instance as of that event's cursor.
 */
describe("the same cells through the SDK, watching the revoking instance and verifying through the other", () => {
  let auth: TesseraAuth;
  beforeAll(async () => {
    auth = createTesseraAuth({
      server: m.b.url,
      caFile: join(m.certs.dir, "ca.crt"),
      credential: m.verifier,
      transport: splitTransport(checked, m.tb),
    });
    expect(await auth.ready(10_000)).toBe(true);
  });
  afterAll(() => auth?.close());

  /** The SDK's answer: "ok", or the refusal's reason. */
  async function sdk(header: string, thumbprint?: string): Promise<string> {
    try {
      await auth.authenticate(header, thumbprint);
      return "ok";
    } catch (err) {
      return (err as { reason?: string }).reason ?? String(err);
    }
  }

  // Refresh tokens and certificates are not presented to a service in a header; a certificate's
  // own access token has its cells below.
  const certificateToken = "access token issued to a client certificate alone";
  const headerless = ["refresh token", "client certificate (binding)", certificateToken];
  it.each(CELLS.filter(([kind]) => !headerless.includes(kind)))(
    "%s, %s on one instance: refused by the SDK's next call once the event is in",
    async (kind, action) => {
      const held = await KINDS[kind]!.make();
      const presented = held.presented!;
      const header = presented.startsWith("Basic ") ? presented : `Bearer ${presented}`;
      expect(await sdk(header)).toBe("ok");
      // The second call is answered by the SDK itself (its cache, or offline for a JWT).
      const calls = auth.stats().verifyCalls;
      expect(await sdk(header)).toBe("ok");
      expect(auth.stats().verifyCalls).toBe(calls);

      const events = auth.stats().watch!.events;
      await held.acts[action]!();
      await expect.poll(() => auth.stats().watch!.events).toBeGreaterThan(events);
      expect(await sdk(header)).not.toBe("ok");
    },
  );

  // A takeover or contest names no event the token's machine user is in: the SDK asks Tessera
  // on every call of such a token (never offline, never cached), so no event is waited for.
  it.each(CELLS.filter(([kind]) => kind === certificateToken))(
    "%s, %s on one instance: asked on every call, refused by the SDK's very next one",
    async (kind, action) => {
      const held = await KINDS[kind]!.make();
      try {
        const header = `Bearer ${held.presented!}`;
        for (let i = 0; i < 2; i++) {
          const calls = auth.stats().verifyCalls;
          expect(await sdk(header, held.thumbprint)).toBe("ok");
          expect(auth.stats().verifyCalls).toBe(calls + 1);
        }
        await held.acts[action]!();
        expect(await sdk(header, held.thumbprint)).not.toBe("ok");
      } finally {
        await held.close?.();
      }
    },
  );
});
