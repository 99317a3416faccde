import { request, type Server } from "node:https";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import express, { type Request } from "express";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import { generateToken } from "../src/auth/token-format.js";
import {
  createTesseraAuthMiddleware,
  principalOf,
  type TesseraAuthMiddleware,
  type TesseraPrincipal,
} from "../src/sdk/server/index.js";
import { DbProxy } from "./db-proxy.js";
import { clientFor, DATABASES, listenHttps, startTestServer, type TestServer } from "./helpers.js";
import { adminLogin, clients, short } from "./machine-fixtures.js";

/**
 * The SDK's plain Node middleware mounted in an Express 5 app served over TLS, against a
 * real Tessera reached through a TCP proxy the test can cut: a valid credential reaches the
 * route with its principal on `req`; a missing or invalid one is answered 401, a missing
 * scope 403, and Tessera out of reach 503 with Retry-After, each in the JSON error shape of
 * the seeds (`{"ok": false, "error": …}`, plus Tessera's `reason`) without the route running.
 */

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Record<string, unknown>;
}

/** GET `path` of the Express app (node:https, HTTP/1.1), with an Authorization header. */
function get(url: string, ca: Buffer, path: string, authorization?: string): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${url}${path}`,
      { ca, agent: false, headers: authorization ? { authorization } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown>,
          }),
        );
      },
    );
    req.on("error", reject);
    req.end();
  });
}

/** Tessera's default prefix of personal access tokens (auth.tokens.patPrefix). */
const PAT_PREFIX = "tsr_pat_";

/** A JWT whose signature is changed in its middle (the last character's low bits are unused). */
function forged(jwt: string): string {
  const dot = jwt.lastIndexOf(".");
  const mid = dot + Math.floor((jwt.length - dot) / 2);
  return `${jwt.slice(0, mid)}${jwt[mid] === "A" ? "B" : "A"}${jwt.slice(mid + 1)}`;
}

describe.each(DATABASES)("the Tessera middleware in an Express app, against Tessera on $name", (db) => {
  let ts: TestServer;
  let proxy: DbProxy;
  let server: Server;
  let url: string;
  let read: TesseraAuthMiddleware<Request>;
  let admin: TesseraAuthMiddleware<Request>;
  /** Calls that reached a route (a refusal must not). */
  let reached = 0;
  let userId: string;
  let tenantId: string;
  const creds: Record<string, string> = {};

  beforeAll(async () => {
    ts = await startTestServer(db);
    proxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    const plain = ts.connect();
    const root = clients(plain, await adminLogin(plain));
    tenantId = (await root.tenants.createTenant({ name: `express-${short()}` })).tenant!.id;
    const verifier = await root.machines.createMachineUser({
      tenantId,
      name: `express-service-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    const username = `bob-${short()}`;
    userId = (
      await root.users.createUser({
        username,
        password: "bob password long enough",
        scopes: ["things:read"],
        tenantId,
      })
    ).user!.id;
    creds.jwt = (
      await createClient(UserService, plain).login({
        username,
        password: "bob password long enough",
        tenant: tenantId,
      })
    ).accessToken;
    creds.pat = (
      await clientFor(TokenService, plain, creds.jwt).createPersonalAccessToken({
        name: "express",
        scopes: ["things:read"],
      })
    ).token;

    // Both middlewares on one core: one JWKS cache, one VerifyCredential client.
    read = createTesseraAuthMiddleware<Request>(
      {
        server: `https://localhost:${proxy.port}`,
        caFile: join(ts.certs.dir, "ca.crt"),
        credential: verifier.token,
        clockSkewSeconds: 1,
        verifyTimeoutMs: 1500,
        // Per-call verification: an opaque credential is asked of Tessera on every call.
        watch: false,
      },
      { rule: { scopes: ["things:read"] } },
    );
    admin = createTesseraAuthMiddleware<Request>(read.auth, { rule: { scopes: ["things:admin"] } });
    const app = express();
    const route = (req: Request, res: express.Response) => {
      reached++;
      const principal = (req as Request & { tesseraPrincipal?: TesseraPrincipal }).tesseraPrincipal;
      res.json({ ok: true, same: principal !== undefined && principalOf(req) === principal, principal });
    };
    app.get("/v1/things", read, route);
    app.get("/v1/admin", admin, route);
    ({ server, url } = await listenHttps(ts.certs.dir, app));
  });

  afterAll(async () => {
    await new Promise((resolve) => server?.close(resolve));
    read?.auth.close();
    await proxy?.close();
    await ts?.close();
  });

  it("lets a valid JWT (checked offline) and a valid PAT (through VerifyCredential) through, with the principal on req", async () => {
    for (const [kind, credential] of [
      ["jwt", creds.jwt],
      ["pat", creds.pat],
    ] as const) {
      const before = reached;
      const ok = await get(url, ts.certs.ca, "/v1/things", `Bearer ${credential}`);
      expect(ok.status, kind).toBe(200);
      expect(reached, kind).toBe(before + 1);
      expect(ok.body.same, kind).toBe(true);
      expect(ok.body.principal, kind).toMatchObject({
        id: userId,
        kind: "user",
        tenantId,
        credentialKind: kind,
      });
      expect((ok.body.principal as { scopes: string[] }).scopes, kind).toContain("things:read");
    }
  });

  it("answers a missing or invalid credential 401 in the seeds' JSON shape with WWW-Authenticate, before the route", async () => {
    const before = reached;
    const none = await get(url, ts.certs.ca, "/v1/things");
    expect(none.status).toBe(401);
    expect(none.headers["content-type"]).toBe("application/json");
    expect(none.headers["cache-control"]).toBe("no-store");
    expect(none.headers["www-authenticate"]).toBe('Bearer realm="tessera"');
    expect(none.body).toEqual({
      ok: false,
      error: "Unauthorized",
      reason: "AUTH_REQUIRED",
      message: expect.any(String),
    });

    const badJwt = await get(url, ts.certs.ca, "/v1/things", `Bearer ${forged(creds.jwt!)}`);
    expect(badJwt.status).toBe(401);
    expect(badJwt.body).toMatchObject({ ok: false, error: "Unauthorized", reason: "TOKEN_INVALID" });
    expect(badJwt.headers["www-authenticate"]).toMatch(/^Bearer realm="tessera", error="invalid_token"/);

    // Well formed (prefix, length, checksum) but issued to no one: Tessera answers NOT_FOUND.
    const unknown = generateToken(PAT_PREFIX);
    const unknownPat = await get(url, ts.certs.ca, "/v1/things", `Bearer ${unknown.token}`);
    expect(unknownPat.status).toBe(401);
    expect(unknownPat.body).toMatchObject({
      ok: false,
      error: "Unauthorized",
      reason: "CREDENTIALS_INVALID",
    });
    expect(unknownPat.headers["www-authenticate"]).toMatch(/^Bearer realm="tessera", error="invalid_token"/);
    // Nothing of the credential is echoed back.
    expect(JSON.stringify(unknownPat)).not.toContain(unknown.secret);
    // Not of any shape Tessera issues: malformed, answered as an invalid token.
    const junk = await get(url, ts.certs.ca, "/v1/things", "Bearer tsr_pat_not_a_token_of_anyone");
    expect(junk.status).toBe(401);
    expect(junk.body).toMatchObject({ ok: false, error: "Unauthorized", reason: "TOKEN_INVALID" });
    expect(reached).toBe(before);
  });

  it("answers a credential without the route's scope 403 with insufficient_scope, before the route", async () => {
    const before = reached;
    for (const credential of [creds.jwt, creds.pat]) {
      const denied = await get(url, ts.certs.ca, "/v1/admin", `Bearer ${credential}`);
      expect(denied.status).toBe(403);
      expect(denied.body).toMatchObject({ ok: false, error: "Forbidden", reason: "ACCESS_DENIED" });
      expect(denied.headers["www-authenticate"]).toBe(
        'Bearer realm="tessera", error="insufficient_scope", scope="things:admin"',
      );
    }
    expect(reached).toBe(before);
  });

  it("answers 503 with Retry-After while Tessera cannot be reached, and lets the credential through once it can", async () => {
    const before = reached;
    proxy.cut();
    try {
      const down = await get(url, ts.certs.ca, "/v1/things", `Bearer ${creds.pat}`);
      expect(down.status).toBe(503);
      expect(down.headers["retry-after"]).toBe("1");
      expect(down.body).toMatchObject({ ok: false, error: "Service Unavailable", reason: "UNAVAILABLE" });
      expect(reached).toBe(before);
    } finally {
      proxy.restore();
    }
    const back = await get(url, ts.certs.ca, "/v1/things", `Bearer ${creds.pat}`);
    expect(back.status).toBe(200);
    expect(reached).toBe(before + 1);
  });
});
