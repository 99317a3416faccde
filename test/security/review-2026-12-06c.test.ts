import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { connect, createSecureServer, type Http2ServerRequest } from "node:http2";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import {
  createTesseraAuth,
  createTesseraAuthMiddleware,
  type TesseraAuth,
} from "../../src/sdk/server/index.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import {
  adminLogin,
  boundMachineUser,
  clients,
  connectedWithCertificate,
  mintClientCertificate,
  short,
  verifierMachine,
} from "../machine-fixtures.js";

/**
 * The adversarial review of 2026-12-06 (third pass: the SDK's downstream verification,
 * machine credentials, secrets at rest and in outputs), against a real server over TLS:
 * each test is a finding of that review, failing on the main it was found on, and holds
 * with its fix.
 */
describe.each(DATABASES)("review 2026-12-06c on $name", (db) => {
  let ts: TestServer;
  let root: string;
  const cores: TesseraAuth[] = [];

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    root = await adminLogin(ts.connect());
  }, 120_000);

  afterEach(() => {
    for (const c of cores.splice(0)) c.close();
  });

  afterAll(async () => {
    await ts?.close();
  });

  /** A user of `tenantId`, logged in. */
  async function loggedIn(tenantId: string) {
    const username = `u-${short()}`;
    const password = "user password long";
    await clients(ts.connect(), root).users.createUser({
      username,
      password,
      scopes: ["workflows:read"],
      tenantId,
    });
    return createClient(UserService, ts.connect()).login({ username, password, tenant: tenantId });
  }

  it("SDK: a session ended while the revocation stream was down is refused while a long catch-up is still arriving", async () => {
    const admin = clients(ts.connect(), root);
    const tenantId = (await admin.tenants.createTenant({ name: `catchup-${short()}` })).tenant!.id;
    const verifier = await verifierMachine(ts.connect(), root, tenantId);

    // The network between the service and Tessera, under the test's hand: it can cut the
    // stream, keep it from reconnecting, and slow down the messages of the resumed one.
    let drop: () => void = () => {};
    const dropped = new Promise<void>((resolve) => {
      drop = resolve;
    });
    let reconnect: () => void = () => {};
    let reconnected: Promise<void> | undefined;
    let deliver: () => void = () => {};
    let delivered: Promise<void> | undefined;
    let streams = 0;
    const network: Interceptor = (next) => async (req) => {
      if (req.method.name !== "WatchRevocations") return next(req);
      const n = ++streams;
      if (n > 1) await reconnected;
      const res = await next(req);
      if (!res.stream) return res;
      const inner = res.message[Symbol.asyncIterator]();
      async function* message() {
        for (let i = 0; ; i++) {
          if (n > 1 && i === 1) await delivered;
          const next = await Promise.race([
            inner.next(),
            n === 1 ? dropped.then(() => "cut" as const) : new Promise<never>(() => {}),
          ]);
          if (next === "cut") throw new Error("connection reset");
          if (next.done) return;
          yield next.value;
        }
      }
      return { ...res, message: message() };
    };
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      watchBackoffMs: { min: 10, max: 20 },
      // Clocks in step: a token issued a second after the stream came up is checked offline.
      clockSkewSeconds: 0,
      transport: createGrpcTransport({
        baseUrl: ts.server.url,
        nodeOptions: { ca: readFileSync(join(ts.certs.dir, "ca.crt")) },
        interceptors: [network],
      }),
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 1100));

    // A user logged in once the stream is up (its token is checked offline from then on),
    // and another user's personal access token, which Tessera answers for.
    const victim = await loggedIn(tenantId);
    const bystander = await loggedIn(tenantId);
    const pat = (
      await clientFor(TokenService, ts.connect(), bystander.accessToken).createPersonalAccessToken({
        name: "cli",
        scopes: ["workflows:read"],
      })
    ).token;
    expect((await auth.authenticate(`Bearer ${pat}`)).tenantId).toBe(tenantId);
    const offline = auth.stats().offlineJwts;
    expect((await auth.authenticate(`Bearer ${victim.accessToken}`)).sessionId).toBeDefined();
    expect(auth.stats().offlineJwts).toBe(offline + 1);

    // The stream breaks and stays down while the tenant has a busy spell (more events than
    // one message of the catch-up carries), after which the victim's session ends.
    reconnected = new Promise<void>((resolve) => {
      reconnect = resolve;
    });
    delivered = new Promise<void>((resolve) => {
      deliver = resolve;
    });
    drop();
    await expect.poll(() => auth.watching(), { timeout: 10_000 }).toBe(false);
    const ids = Array.from({ length: 600 }, () => randomUUID());
    await ts.app.sql.run(
      `insert into revocation_events (kind, subject_id, tenant_id, occurred_at) values ${ids.map(() => "('credential', ?, ?, ?)").join(", ")}`,
      ids.flatMap((id) => [id, tenantId, new Date()]),
    );
    await clientFor(UserService, ts.connect(), victim.accessToken).logout({
      refreshToken: victim.refreshToken,
    });

    // The stream resumes; the first part of the catch-up has arrived, the rest is on its way.
    reconnect();
    await expect.poll(() => auth.watching(), { timeout: 10_000 }).toBe(true);
    try {
      // Another caller of the tenant is answered by Tessera meanwhile, as any would be.
      expect((await auth.authenticate(`Bearer ${pat}`)).tenantId).toBe(tenantId);
      // The ended session's token is refused: Tessera says so, the stream has not yet.
      await expect(auth.authenticate(`Bearer ${victim.accessToken}`)).rejects.toMatchObject({
        reason: "TOKEN_REVOKED",
      });
    } finally {
      deliver();
    }
    // Once the rest has arrived, the stream itself refuses it.
    await expect
      .poll(() => auth.stats().watch!.events, { timeout: 10_000 })
      .toBeGreaterThanOrEqual(ids.length + 1);
    await expect(auth.authenticate(`Bearer ${victim.accessToken}`)).rejects.toMatchObject({
      reason: "TOKEN_REVOKED",
    });
  });

  it("SDK: a certificate-bound token stops passing on a connection whose client certificate has expired since its handshake", async () => {
    const admin = clients(ts.connect(), root);
    const verifier = (
      await admin.machines.createMachineUser({
        name: `verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    // A short-lived workload certificate (its expiry is how it is revoked), bound to a
    // machine user, which obtains an access token bound to it (RFC 8705).
    const pem = await mintClientCertificate(ts, 8 / 86_400);
    await boundMachineUser(admin, `workload-${short()}`, pem.fingerprint, ["workflows:read"]);
    const over = await connectedWithCertificate(ts, pem);
    const { accessToken } = await over.client.issueAccessToken({});
    over.sessionManager.abort();

    // A downstream service on HTTP/2 that asks for client certificates of the same CA.
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
    });
    cores.push(auth);
    const middleware = createTesseraAuthMiddleware<Http2ServerRequest>(auth, {
      rule: { scopes: ["workflows:read"] },
    });
    const downstream = createSecureServer(
      {
        key: readFileSync(join(ts.certs.dir, "server.key")),
        cert: readFileSync(join(ts.certs.dir, "server.crt")),
        ca: ts.certs.ca,
        requestCert: true,
        rejectUnauthorized: false,
      },
      (req, res) =>
        middleware(req, res, () => {
          res.writeHead(200);
          res.end("ok");
        }),
    );
    await new Promise<void>((resolve) => downstream.listen(0, "127.0.0.1", resolve));
    const port = (downstream.address() as AddressInfo).port;
    const session = connect(`https://localhost:${port}`, { ca: ts.certs.ca, cert: pem.cert, key: pem.key });
    const call = () =>
      new Promise<number>((resolve, reject) => {
        const req = session.request({ ":path": "/work", authorization: `Bearer ${accessToken}` });
        req.on("response", (headers) => resolve(Number(headers[":status"])));
        req.on("error", reject);
        req.resume();
        req.end();
      });
    try {
      expect(await call()).toBe(200);
      // The certificate's notAfter passes; the client keeps its connection open.
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, pem.notAfter + 1100 - Date.now())));
      expect(await call(), "an expired certificate still carried its bound token").toBe(401);
    } finally {
      session.close();
      downstream.close();
    }
  });
});
