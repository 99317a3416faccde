import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType, MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { RevocationKind } from "../../gen/tessera/v1/verification_service_pb.js";
import { createClientCertificate, writeCrl } from "../../src/certs/index.js";
import { createTesseraAuth, type TesseraAuth } from "../../src/sdk/server/index.js";
import { clientFor, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";
import { ev, Watcher } from "../watch-fixtures.js";

/**
 * The adversarial review of 2026-12-05, against a real server over TLS: each test is a
 * finding of that review, failing on the main it was found on, and holds with its fix.
 */
describe.each(DATABASES)("review 2026-12-05 on $name", (db) => {
  let ts: TestServer;
  let root: string;
  const cores: TesseraAuth[] = [];

  beforeAll(async () => {
    ts = await startTestServer(db);
    root = await adminLogin(ts.connect());
  }, 120_000);

  afterEach(() => {
    for (const c of cores.splice(0)) c.close();
  });

  afterAll(async () => {
    await ts?.close();
  });

  /** A tenant with a user who may sign in (no scopes), and its id. */
  async function tenantWithUser(): Promise<{ tenantId: string; username: string; password: string }> {
    const admin = clients(ts.connect(), root);
    const tenantId = (await admin.tenants.createTenant({ name: `review-${short()}` })).tenant!.id;
    const username = `u-${short()}`;
    const password = "review user password";
    await admin.users.createUser({ tenantId, username, password, scopes: [] });
    return { tenantId, username, password };
  }

  async function login(t: { tenantId: string; username: string; password: string }) {
    return createClient(UserService, ts.connect()).login({
      username: t.username,
      password: t.password,
      tenant: t.tenantId,
    });
  }

  it("a downstream service of tenant A never admits tenant B's access token, live or revoked, where VerifyCredential would not", async () => {
    const a = await tenantWithUser();
    const b = await tenantWithUser();
    const verifier = (
      await clients(ts.connect(), root).machines.createMachineUser({
        tenantId: a.tenantId,
        name: `verifier-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
    // The service's clock runs 2 s behind until its stream is up, so that tokens issued
    // after that (whole-second `iat`) fall within what its revocation stream covers, without
    // waiting on the real clock; no clock skew is allowed for.
    let offset = -2000;
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      clockSkewSeconds: 0,
      now: () => Date.now() + offset,
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    offset = 0;

    // Tenant A's own access token: verified by Tessera once, then offline (the control).
    const own = await login(a);
    await auth.authenticate(`Bearer ${own.accessToken}`);
    const ownAgain = await login(a);
    const offlineBefore = auth.stats().offlineJwts;
    expect((await auth.authenticate(`Bearer ${ownAgain.accessToken}`)).tenantId).toBe(a.tenantId);
    expect(auth.stats().offlineJwts).toBe(offlineBefore + 1);

    // Tenant B's: VerifyCredential answers it as unknown for this service (the tenant wall),
    // and the stream never tells this service of B's revocations.
    const other = await login(b);
    await expect(auth.authenticate(`Bearer ${other.accessToken}`)).rejects.toMatchObject({
      reason: "CREDENTIALS_INVALID",
    });
    const ended = await login(b);
    await createClient(UserService, ts.connect()).logout({ refreshToken: ended.refreshToken });
    await expect(auth.authenticate(`Bearer ${ended.accessToken}`)).rejects.toMatchObject({
      reason: "CREDENTIALS_INVALID",
    });
  });

  it("a personal access token or API key never creates one that outlives it", async () => {
    const t = await tenantWithUser();
    const session = await login(t);
    const bySession = clientFor(TokenService, ts.connect(), session.accessToken);
    const parentEnd = Date.now() + 3600_000;
    const parent = await bySession.createPersonalAccessToken({
      name: "short-lived",
      expiresAt: timestampFromMs(parentEnd),
    });
    const byToken = clientFor(TokenService, ts.connect(), parent.token);
    // No expiry asked for: the new token ends when the one that made it does, not never.
    const child = await byToken.createPersonalAccessToken({ name: "laundered" });
    expect(child.expiresAt, "a token without an end made by one that ends").toBeDefined();
    expect(Number(child.expiresAt!.seconds) * 1000).toBeLessThanOrEqual(parentEnd);
    const key = await byToken.createApiKey({ name: "laundered key" });
    expect(key.expiresAt).toBeDefined();
    expect(Number(key.expiresAt!.seconds) * 1000).toBeLessThanOrEqual(parentEnd);
    // A later end asked for: refused as authority the caller does not hold.
    const later = await byToken
      .createPersonalAccessToken({ name: "later", expiresAt: timestampFromMs(parentEnd + 86_400_000) })
      .then(
        () => undefined,
        (err: unknown) => ConnectError.from(err),
      );
    expect(later?.code).toBe(Code.PermissionDenied);
    // A session still creates tokens without an end (the usual way to make one).
    const free = await bySession.createPersonalAccessToken({ name: "from the session" });
    expect(free.expiresAt).toBeUndefined();
  });

  it("a WatchRevocations stream ends once its own caller is disabled: nothing of its tenant reaches it after", async () => {
    const a = await tenantWithUser();
    const admin = clients(ts.connect(), root);
    const verifier = await admin.machines.createMachineUser({
      tenantId: a.tenantId,
      name: `watcher-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["auth:verify"],
    });
    const w = Watcher.open(ts.connect(), verifier.token);
    await w.first();
    await admin.machines.updateMachineUser({ id: verifier.machineUser!.id, disabled: true });
    // A revocation in the tenant after the caller's own: a disabled caller must not see it.
    const s = await login(a);
    await createClient(UserService, ts.connect()).logout({ refreshToken: s.refreshToken });
    const sid = JSON.parse(Buffer.from(s.accessToken.split(".")[1]!, "base64url").toString("utf8")).sid;
    const later = ev(RevocationKind.SESSION, sid);
    await w.until(() => w.ended !== undefined || w.events.includes(later), 10_000, "the end or the event");
    w.close();
    expect(w.events, "an event delivered to a disabled caller").not.toContain(later);
    expect(w.ended).toBeDefined();
    // Its client reconnects from its cursor, and is authenticated again: refused.
    const again = Watcher.open(ts.connect(), verifier.token, w.cursor);
    const refusal = await again.end();
    again.close();
    expect(ConnectError.from(refusal).code).toBe(Code.Unauthenticated);
    expect(again.events).toEqual([]);
  });

  it("a client certificate revoked by the CRL stops authenticating on the connection it already has", async () => {
    const admin = clients(ts.connect(), root);
    const out = join(mkdtempSync(join(tmpdir(), "tessera-review-")), "revoked-backend");
    const minted = await createClientCertificate(ts.certs.dir, "revoked-backend", out);
    const cert = readFileSync(minted.certPath, "utf8");
    const key = readFileSync(minted.keyPath, "utf8");
    const mu = (
      await admin.machines.createMachineUser({ name: `bound-${short()}`, authType: MachineAuthType.BEARER })
    ).machineUser!;
    await admin.machines.bindCertificate({
      machineUserId: mu.id,
      identity: { case: "sha256Fingerprint", value: minted.sha256Fingerprint },
    });
    // One HTTP/2 connection, kept by the transport between calls.
    const backend = createClient(
      MachineUserService,
      createConnectTransport({
        baseUrl: ts.server.url,
        httpVersion: "2",
        nodeOptions: { ca: ts.certs.ca, cert, key },
      }),
    );
    let handshakes = 0;
    const counted = () => handshakes++;
    ts.server.server.on("secureConnection", counted);
    try {
      expect((await backend.checkAuthentication({})).machineUserId).toBe(mu.id);
      await writeCrl(ts.certs.dir, [cert]);
      await ts.server.reloadTls();
      const after = await backend.checkAuthentication({}).then(
        (r) => r.machineUserId,
        (err: unknown) => ConnectError.from(err),
      );
      expect(handshakes, "both calls on one connection").toBe(1);
      expect(after, "a revoked certificate authenticated its connection's next request").toBeInstanceOf(
        ConnectError,
      );
      expect((after as ConnectError).code).toBe(Code.Unauthenticated);
    } finally {
      ts.server.server.off("secureConnection", counted);
    }
  });
});
