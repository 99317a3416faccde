import { readFileSync } from "node:fs";
import { connect as connectHttp2 } from "node:http2";
import { request } from "node:https";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import Fastify, { type FastifyInstance, type RawServerBase } from "fastify";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import {
  createTesseraAuth,
  createTesseraAuthMiddleware,
  type DownstreamRule,
  principalOf,
  type TesseraAuth,
  type TesseraMiddlewareRequest,
  type TesseraMiddlewareResponse,
  type TesseraPrincipal,
} from "../src/sdk/server/index.js";
import { DbProxy } from "./db-proxy.js";
import { DATABASES, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * The Node middleware under Fastify 5 (issue 22 item 5: "usable with Express or Fastify"),
 * mounted as a Fastify user would without plugins: a route-level `onRequest` hook that runs
 * it on `request.raw`/`reply.raw` with the hook's `done` as `next`, the principal copied onto
 * a decorated `request.tesseraPrincipal` (the pattern the README shows). Fastify over TLS,
 * HTTP/1.1 and HTTP/2, against a real Tessera reached through a TCP proxy the test can cut.
 */

declare module "fastify" {
  interface FastifyRequest {
    tesseraPrincipal: TesseraPrincipal | undefined;
  }
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Record<string, unknown>;
}

/** One request over TLS, HTTP/1.1 (node:https) or HTTP/2 (node:http2). */
function call(
  url: string,
  ca: Buffer,
  opts: { method?: string; path: string; authorization?: string; http2?: boolean },
): Promise<Answer> {
  const headers = opts.authorization ? { authorization: opts.authorization } : {};
  const parse = (status: number, h: Answer["headers"], chunks: Buffer[]): Answer => {
    const text = Buffer.concat(chunks).toString("utf8");
    return { status, headers: h, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
  };
  return new Promise((resolve, reject) => {
    if (opts.http2) {
      const session = connectHttp2(url, { ca });
      session.on("error", reject);
      const stream = session.request({ ":method": opts.method ?? "GET", ":path": opts.path, ...headers });
      stream.end();
      const chunks: Buffer[] = [];
      let status = 0;
      let h: Answer["headers"] = {};
      stream.on("response", (r) => {
        status = Number(r[":status"]);
        h = r as Answer["headers"];
      });
      stream.on("data", (c: Buffer) => chunks.push(c));
      stream.on("end", () => {
        session.close();
        resolve(parse(status, h, chunks));
      });
      stream.on("error", reject);
      return;
    }
    const req = request(
      `${url}${opts.path}`,
      { method: opts.method ?? "GET", ca, agent: false, headers },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => resolve(parse(res.statusCode ?? 0, res.headers, chunks)));
      },
    );
    req.on("error", reject);
    req.end();
  });
}

/**
 * The Fastify pattern: one `onRequest` hook per rule (all on one core). A refusal is written
 * by the middleware on `reply.raw` and `done` is not called: Fastify stops the request there
 * (its onResponse hooks and request log still run, from the raw response's `finish`).
 */
function tesseraHook(auth: TesseraAuth, rule: DownstreamRule) {
  const middleware = createTesseraAuthMiddleware<TesseraMiddlewareRequest>(auth, { rule });
  // Typed by what it reads, so that one hook fits Fastify over HTTP/1.1 and over HTTP/2.
  return (
    request: { raw: TesseraMiddlewareRequest; tesseraPrincipal: TesseraPrincipal | undefined },
    reply: { raw: TesseraMiddlewareResponse },
    done: (err?: Error) => void,
  ): void => {
    middleware(request.raw, reply.raw, (err) => {
      request.tesseraPrincipal = principalOf(request.raw);
      done(err as Error | undefined);
    });
  };
}

describe.each(DATABASES)("the Tessera middleware under Fastify on $name", (db) => {
  let ts: TestServer;
  let proxy: DbProxy;
  let auth: TesseraAuth;
  const apps: { name: string; http2: boolean; app: { close(): Promise<unknown> }; url: string }[] = [];
  /** What the handlers and the onResponse hook saw, for the last request. */
  const seen: { handled: TesseraPrincipal[]; responses: number[] } = { handled: [], responses: [] };
  const creds: Record<string, string> = {};
  let userId: string;
  let tenantId: string;

  /** The routes, on Fastify over HTTP/1.1 or HTTP/2 alike (the same hooks, no casts). */
  function routes<S extends RawServerBase>(app: FastifyInstance<S>): FastifyInstance<S> {
    app.decorateRequest("tesseraPrincipal", undefined);
    // Headers every answer needs, refusals included: on the raw response, which the
    // middleware's writeHead keeps (reply.header() would apply to Fastify's replies only).
    app.addHook("onRequest", (_request, reply, done) => {
      reply.raw.setHeader("x-content-type-options", "nosniff");
      done();
    });
    app.addHook("onResponse", (_request, reply, done) => {
      seen.responses.push(reply.statusCode);
      done();
    });
    app.get("/health", { onRequest: tesseraHook(auth, { public: true }) }, async () => ({ ok: true }));
    app.get(
      "/v1/workflows",
      { onRequest: tesseraHook(auth, { scopes: ["workflows:read"] }) },
      async (req) => {
        seen.handled.push(req.tesseraPrincipal!);
        return {
          ok: true,
          data: { principal_id: req.tesseraPrincipal?.id, tenant_id: req.tesseraPrincipal?.tenantId },
        };
      },
    );
    app.post("/v1/runs", { onRequest: tesseraHook(auth, { scopes: ["workflows:run"] }) }, async (req) => {
      seen.handled.push(req.tesseraPrincipal!);
      return { ok: true };
    });
    return app;
  }

  async function startFastify(http2: boolean): Promise<{ app: { close(): Promise<unknown> }; url: string }> {
    const https = {
      cert: readFileSync(join(ts.certs.dir, "server.crt")),
      key: readFileSync(join(ts.certs.dir, "server.key")),
    };
    const app = http2
      ? routes(Fastify({ http2: true, https: { ...https, allowHTTP1: true } }))
      : routes(Fastify({ https }));
    await app.listen({ host: "127.0.0.1", port: 0 });
    const address = app.server.address();
    const port = typeof address === "object" && address ? address.port : 0;
    return { app, url: `https://localhost:${port}` };
  }

  beforeAll(async () => {
    ts = await startTestServer(db);
    proxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    const root = await adminLogin(ts.connect());
    const admin = clients(ts.connect(), root);
    tenantId = (await admin.tenants.createTenant({ name: `fastify-${short()}` })).tenant!.id;
    const verifier = await admin.machines.createMachineUser({
      tenantId,
      name: `fastify-verifier-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    const username = `dave-${short()}`;
    userId = (
      await admin.users.createUser({
        username,
        password: "dave password long",
        scopes: ["workflows:read"],
        tenantId,
      })
    ).user!.id;
    const machine = await admin.machines.createMachineUser({
      tenantId,
      name: `fastify-worker-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["workflows:read", "workflows:run"],
    });
    creds.machine = machine.token;
    creds.machineId = machine.machineUser!.id;
    auth = createTesseraAuth({
      server: `https://localhost:${proxy.port}`,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier.token,
      clockSkewSeconds: 1,
      verifyTimeoutMs: 1500,
      watchBackoffMs: { min: 50, max: 200 },
    });
    expect(await auth.ready(10_000)).toBe(true);
    // Issued after the stream's coverage began (its start plus the 1 s skew; `iat` is whole
    // seconds): the JWT is checked offline.
    await new Promise((r) => setTimeout(r, 2100));
    creds.jwt = (
      await createClient(UserService, ts.connect()).login({
        username,
        password: "dave password long",
        tenant: tenantId,
      })
    ).accessToken;
    for (const http2 of [false, true])
      apps.push({ name: http2 ? "HTTP/2" : "HTTP/1.1", http2, ...(await startFastify(http2)) });
  }, 120_000);

  afterAll(async () => {
    for (const a of apps) await a.app.close();
    auth?.close();
    await proxy?.close();
    await ts?.close();
  });

  const each = () => apps.map((a) => [a.name, a] as const);

  it("admits a valid JWT, checked offline, with the principal on the Fastify request", async () => {
    for (const [name, a] of each()) {
      seen.handled.length = 0;
      // An opaque credential, through VerifyCredential, on a route needing another scope. Its
      // VALID answer also shows the core that its stream carries this tenant's revocations,
      // so this tenant's access tokens are admitted offline from then on.
      const run = await call(a.url, ts.certs.ca, {
        method: "POST",
        path: "/v1/runs",
        authorization: `Bearer ${creds.machine}`,
        http2: a.http2,
      });
      expect(run.status, name).toBe(200);
      expect(seen.handled[0], name).toMatchObject({ id: creds.machineId, kind: "machine_user" });
      const before = auth.stats().verifyCalls;
      const res = await call(a.url, ts.certs.ca, {
        path: "/v1/workflows",
        authorization: `Bearer ${creds.jwt}`,
        http2: a.http2,
      });
      expect(res.status, name).toBe(200);
      expect(res.body, name).toEqual({ ok: true, data: { principal_id: userId, tenant_id: tenantId } });
      expect(seen.handled[1], name).toMatchObject({
        id: userId,
        tenantId,
        credentialKind: "jwt",
        kind: "user",
      });
      expect(auth.stats().verifyCalls, name).toBe(before);
      expect((await call(a.url, ts.certs.ca, { path: "/health", http2: a.http2 })).body).toEqual({
        ok: true,
      });
    }
  });

  it("refuses a missing or invalid credential with 401, the JSON error shape and WWW-Authenticate", async () => {
    const jwt = creds.jwt!;
    const mid = jwt.length - 20;
    const forged = `${jwt.slice(0, mid)}${jwt[mid] === "A" ? "B" : "A"}${jwt.slice(mid + 1)}`;
    // A machine token with one character changed: Tessera refuses it (malformed by its checksum).
    const m = creds.machine!;
    const unknown = `${m.slice(0, -1)}${m.endsWith("A") ? "B" : "A"}`;
    for (const [name, a] of each()) {
      seen.handled.length = 0;
      seen.responses.length = 0;
      const none = await call(a.url, ts.certs.ca, { path: "/v1/workflows", http2: a.http2 });
      expect(none.status, name).toBe(401);
      expect(none.body, name).toEqual({
        ok: false,
        error: "Unauthorized",
        reason: "AUTH_REQUIRED",
        message: "authentication required",
      });
      expect(none.headers["www-authenticate"], name).toBe('Bearer realm="tessera"');
      expect(none.headers["content-type"], name).toBe("application/json");
      expect(none.headers["cache-control"], name).toBe("no-store");
      expect(none.headers["x-content-type-options"], name).toBe("nosniff");
      for (const [authorization, reason] of [
        [`Bearer ${forged}`, "TOKEN_INVALID"],
        [`Bearer ${unknown}`, "TOKEN_INVALID"],
        ["Token abc", "AUTH_HEADER_MALFORMED"],
      ] as const) {
        const res = await call(a.url, ts.certs.ca, { path: "/v1/workflows", authorization, http2: a.http2 });
        expect(res.status, `${name} ${reason}`).toBe(401);
        expect(res.body, `${name} ${reason}`).toMatchObject({ ok: false, error: "Unauthorized", reason });
        expect(res.headers["www-authenticate"], `${name} ${reason}`).toMatch(
          /^Bearer realm="tessera", error="invalid_token", error_description="[^"]+"$/,
        );
      }
      expect(seen.handled, name).toEqual([]);
      // Fastify saw each refusal finish (its onResponse hooks and request log run).
      await expect.poll(() => seen.responses).toEqual([401, 401, 401, 401]);
    }
  });

  it("refuses a credential without the route's scope with 403 and an insufficient_scope challenge", async () => {
    for (const [name, a] of each()) {
      seen.handled.length = 0;
      const res = await call(a.url, ts.certs.ca, {
        method: "POST",
        path: "/v1/runs",
        authorization: `Bearer ${creds.jwt}`,
        http2: a.http2,
      });
      expect(res.status, name).toBe(403);
      expect(res.body, name).toEqual({
        ok: false,
        error: "Forbidden",
        reason: "ACCESS_DENIED",
        message: "missing scope workflows:run",
      });
      expect(res.headers["www-authenticate"], name).toBe(
        'Bearer realm="tessera", error="insufficient_scope", scope="workflows:run"',
      );
      expect(seen.handled, name).toEqual([]);
    }
  });

  it("answers 503 with Retry-After while Tessera cannot be reached, and admits again once it can", async () => {
    proxy.cut();
    try {
      // The revocation stream breaks: the cache is emptied and the JWT too must be asked about.
      await expect.poll(() => auth.watching(), { timeout: 5000 }).toBe(false);
      for (const [name, a] of each()) {
        seen.handled.length = 0;
        for (const credential of [creds.jwt, creds.machine]) {
          const res = await call(a.url, ts.certs.ca, {
            path: "/v1/workflows",
            authorization: `Bearer ${credential}`,
            http2: a.http2,
          });
          expect(res.status, name).toBe(503);
          expect(res.headers["retry-after"], name).toBe("1");
          expect(res.body, name).toMatchObject({
            ok: false,
            error: "Service Unavailable",
            reason: "UNAVAILABLE",
          });
        }
        expect(seen.handled, name).toEqual([]);
      }
    } finally {
      proxy.restore();
    }
    expect(await auth.ready(10_000)).toBe(true);
    for (const [name, a] of each()) {
      const res = await call(a.url, ts.certs.ca, {
        path: "/v1/workflows",
        authorization: `Bearer ${creds.machine}`,
        http2: a.http2,
      });
      expect(res.status, name).toBe(200);
    }
  });
});
