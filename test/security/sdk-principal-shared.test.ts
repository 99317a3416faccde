import { request, type Server } from "node:https";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import express, { type Request } from "express";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import {
  createTesseraAuthMiddleware,
  principalOf,
  type TesseraAuthMiddleware,
} from "../../src/sdk/server/index.js";
import { clientFor, listenHttps, SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * While the revocation stream is up, the middleware answers a credential seen before with
 * the very principal object it admitted it as. A handler that changes that object (adds a
 * scope to what it was handed, for its own purposes) must not change what the next call with
 * the same credential is admitted as.
 */
describe("a principal handed to one call cannot widen the next one", () => {
  let ts: TestServer;
  let server: Server;
  let url: string;
  let read: TesseraAuthMiddleware<Request>;
  const creds: Record<string, string> = {};
  const reached: string[] = [];

  /** GET `path` (node:https, HTTP/1.1) with `credential`: the status. */
  function get(path: string, credential: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const req = request(
        `${url}${path}`,
        { ca: ts.certs.ca, agent: false, headers: { authorization: `Bearer ${credential}` } },
        (res) => {
          res.resume();
          res.on("end", () => resolve(res.statusCode ?? 0));
        },
      );
      req.on("error", reject);
      req.end();
    });
  }

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    const plain = ts.connect();
    const root = clients(plain, await adminLogin(plain));
    const tenantId = (await root.tenants.createTenant({ name: `shared-${short()}` })).tenant!.id;
    const verifier = await root.machines.createMachineUser({
      tenantId,
      name: `shared-service-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    const username = `carol-${short()}`;
    const password = "carol password long enough";
    await root.users.createUser({ username, password, scopes: ["things:read"], tenantId });
    const jwt = (await createClient(UserService, plain).login({ username, password, tenant: tenantId }))
      .accessToken;
    creds.pat = (
      await clientFor(TokenService, plain, jwt).createPersonalAccessToken({
        name: "shared",
        scopes: ["things:read"],
      })
    ).token;
    creds.jwt = jwt;

    read = createTesseraAuthMiddleware<Request>(
      { server: ts.server.url, caFile: join(ts.certs.dir, "ca.crt"), credential: verifier.token },
      { rule: { scopes: ["things:read"] } },
    );
    const admin = createTesseraAuthMiddleware<Request>(read.auth, { rule: { scopes: ["things:admin"] } });
    expect(await read.auth.ready(10_000)).toBe(true);
    const app = express();
    app.get("/v1/things", read, (req, res) => {
      // A handler's own business: it widens the scopes it was handed (a bug, not an attack).
      try {
        (principalOf(req)!.scopes as string[]).push("things:admin");
      } catch {
        // Frozen: the handler learns it may not.
      }
      res.json({ ok: true });
    });
    app.get("/v1/admin", admin, (_req, res) => {
      reached.push("admin");
      res.json({ ok: true });
    });
    ({ server, url } = await listenHttps(ts.certs.dir, app));
  });
  afterAll(async () => {
    await new Promise((resolve) => server?.close(resolve));
    read?.auth.close();
    await ts?.close();
  });

  it("refuses the admin route to a PAT and a JWT whose earlier principal a handler widened", async () => {
    for (const kind of ["pat", "jwt"] as const) {
      // Twice: the second call is answered from what the first one admitted.
      expect(await get("/v1/things", creds[kind]!), kind).toBe(200);
      expect(await get("/v1/things", creds[kind]!), kind).toBe(200);
      expect(await get("/v1/admin", creds[kind]!), kind).toBe(403);
    }
    expect(read.auth.stats().cacheHits + read.auth.stats().offlineJwts).toBeGreaterThan(0);
    expect(reached).toEqual([]);
  });
});
