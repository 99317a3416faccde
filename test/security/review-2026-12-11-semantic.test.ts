import { join } from "node:path";
import { crc32 } from "node:zlib";
import { createClient, type Transport } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { hashPool } from "../../src/auth/hash-pool.js";
import { createTesseraAuth, type TesseraAuth } from "../../src/sdk/server/index.js";
import {
  ADMIN_PASSWORD,
  clientFor,
  DATABASES,
  startTestServer,
  type TestServer,
  withHeaders,
} from "../helpers.js";
import { adminLogin, authenticatedAs, basic, clients, short, verifierMachine } from "../machine-fixtures.js";
import { freshIps, LIMITS_ON } from "./fixtures.js";

/**
 * The adversarial review of 2026-12-11 (the semantic side: credentials, revocation, OAuth,
 * SDK, several instances), against a real server over TLS: each test is a finding of that
 * review, failing on the main it was found on, and holds with its fix.
 */
const BUDGET = 20;
const PAT_PREFIX = "tsr_pat_";
const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/** A well-formed token (valid checksum) with a real token's id and a secret of our choosing. */
function withSecret(token: string, secret: string): string {
  const head = `${token.slice(0, PAT_PREFIX.length + 16)}${secret}`;
  let v = crc32(head) >>> 0;
  let sum = "";
  do {
    sum = ALPHABET[v % 62] + sum;
    v = Math.floor(v / 62);
  } while (v > 0);
  return `${head}${sum.padStart(6, "0")}`;
}

const freshIp = freshIps("198.19");

describe.each(DATABASES)("review 2026-12-11 (semantic) on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let admin: string;
  let pat: string;
  const apiKeyFrom = (ip: string, token: string) =>
    createClient(UserService, withHeaders(transport, { "x-forwarded-for": ip, "x-api-key": token }));

  beforeAll(async () => {
    ts = await startTestServer(db, {
      rateLimit: { ...LIMITS_ON, authFailuresPerIpPerMinute: BUDGET },
      server: { trustedProxies: ["127.0.0.1"] },
      auth: { passwordIterations: 20_000, hashConcurrency: 2, hashQueue: 1000 },
    });
    transport = ts.connect();
    admin = (
      await createClient(UserService, withHeaders(transport, { "x-forwarded-for": freshIp() })).login({
        username: "admin",
        password: ADMIN_PASSWORD,
      })
    ).accessToken;
    pat = (
      await clientFor(TokenService, transport, admin).createPersonalAccessToken({ name: "real", scopes: [] })
    ).token;
  });
  afterAll(async () => {
    await ts.close();
  });

  it("X-API-Key: 40 concurrent guesses at a token's secret from one IP get at most its budget of verdicts and PBKDF2 runs (as Bearer)", async () => {
    const ip = freshIp();
    const before = hashPool().stats().started;
    const results = await Promise.allSettled(
      Array.from({ length: 2 * BUDGET }, (_, i) =>
        apiKeyFrom(ip, withSecret(pat, `${"k".repeat(30)}${ALPHABET[i]!}${ALPHABET[i + 1]!}`)).getCurrentUser(
          {},
        ),
      ),
    );
    const messages = results.map((r) =>
      r.status === "rejected" ? (r.reason as { rawMessage: string }).rawMessage : "accepted",
    );
    expect(messages.filter((m) => m === "token is not recognised")).toHaveLength(BUDGET);
    expect(messages.filter((m) => /too many failed authentication attempts/.test(m))).toHaveLength(BUDGET);
    expect(hashPool().stats().started - before).toBeLessThanOrEqual(BUDGET);
    // Over budget: a further guess costs no PBKDF2 at all.
    const after = hashPool().stats().started;
    await expect(apiKeyFrom(ip, withSecret(pat, `${"z".repeat(30)}zz`)).getCurrentUser({})).rejects.toThrow(
      /too many failed authentication attempts/,
    );
    expect(hashPool().stats().started).toBe(after);
  });
});

describe.each(DATABASES)("review 2026-12-11 (semantic, machine tokens) on $name", (db) => {
  let ts: TestServer;
  let root: string;
  let tenantId: string;
  let verifierToken: string;
  const cores: TesseraAuth[] = [];

  beforeAll(async () => {
    ts = await startTestServer(db, { verification: { watchHeartbeatSeconds: 1 } });
    root = await adminLogin(ts.connect());
    const admin = clients(ts.connect(), root);
    tenantId = (await admin.tenants.createTenant({ name: `rev8-${short()}` })).tenant!.id;
    verifierToken = await verifierMachine(ts.connect(), root, tenantId);
  }, 120_000);
  afterAll(async () => {
    for (const c of cores.splice(0)) c.close();
    await ts?.close();
  });

  it("an access token issued before a rotation with a grace period ends with the grace period at a downstream service too (its answer is not cached past it)", async () => {
    const admin = clients(ts.connect(), root);
    const created = await admin.machines.createMachineUser({
      tenantId,
      name: `graced-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes: ["workflows:read"],
    });
    const machineId = created.machineUser!.id;
    const jwt = (await clients(ts.connect(), created.token).machines.issueAccessToken({})).accessToken;
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifierToken,
      cache: { ttlSeconds: 300 },
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    await expect(auth.authenticate(`Bearer ${jwt}`)).resolves.toMatchObject({ id: machineId });

    const GRACE_SECONDS = 8;
    const rotated = await admin.machines.rotateMachineUserCredentials({
      id: machineId,
      gracePeriodSeconds: GRACE_SECONDS,
    });
    const graceEnd = Number(rotated.previousCredentialsExpireAt!.seconds) * 1000;
    // Within the grace period the token still works, at Tessera and downstream; the answer
    // the downstream caches then must not outlive the grace period.
    await expect
      .poll(async () => {
        const events = auth.stats().watch?.events ?? 0;
        return events > 0 && (await auth.authenticate(`Bearer ${jwt}`)).id === machineId;
      })
      .toBe(true);
    expect(Date.now()).toBeLessThan(graceEnd);
    // Past it, Tessera refuses the token...
    await expect
      .poll(() => authenticatedAs(clients(ts.connect(), jwt).machines.checkAuthentication({})), {
        timeout: (GRACE_SECONDS + 10) * 1000,
      })
      .toMatchObject({ reason: "TOKEN_REVOKED" });
    // ...and so does the downstream service, whatever it cached.
    await expect(auth.authenticate(`Bearer ${jwt}`)).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
  });

  it("a Basic pair in a rotation's grace period ends with it at a downstream service too (its answer is not cached past it)", async () => {
    const admin = clients(ts.connect(), root);
    const created = await admin.machines.createMachineUser({
      tenantId,
      name: `graced-basic-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["workflows:read"],
    });
    const machineId = created.machineUser!.id;
    const header = `Basic ${Buffer.from(`${created.username}:${created.password}`).toString("base64")}`;
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifierToken,
      cache: { ttlSeconds: 300 },
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);
    const GRACE_SECONDS = 8;
    const rotated = await admin.machines.rotateMachineUserCredentials({
      id: machineId,
      gracePeriodSeconds: GRACE_SECONDS,
    });
    const graceEnd = Number(rotated.previousCredentialsExpireAt!.seconds) * 1000;
    // Within the grace period the pair still works; the downstream caches Tessera's answer
    // (once the rotation's events have arrived: each drops what it names).
    await expect
      .poll(async () => {
        await auth.authenticate(header);
        return auth.stats().cacheSize;
      })
      .toBe(1);
    expect(Date.now()).toBeLessThan(graceEnd);
    await expect
      .poll(
        () =>
          authenticatedAs(clients(ts.connect(), { authorization: header }).machines.checkAuthentication({})),
        { timeout: (GRACE_SECONDS + 10) * 1000 },
      )
      .toMatchObject({ reason: "TOKEN_REVOKED" });
    await expect(auth.authenticate(header)).rejects.toMatchObject({ reason: "TOKEN_REVOKED" });
  });

  it("a WatchRevocations stream authenticated by a Basic pair in a rotation's grace period ends with the grace period", async () => {
    const admin = clients(ts.connect(), root);
    const created = await admin.machines.createMachineUser({
      tenantId,
      name: `graced-watcher-${short()}`,
      authType: MachineAuthType.BASIC,
      scopes: ["auth:verify"],
    });
    const GRACE_SECONDS = 6;
    const rotated = await admin.machines.rotateMachineUserCredentials({
      id: created.machineUser!.id,
      gracePeriodSeconds: GRACE_SECONDS,
    });
    const graceEnd = Number(rotated.previousCredentialsExpireAt!.seconds) * 1000;
    const watcher = createClient(
      VerificationService,
      withHeaders(ts.connect(), basic(created.username, created.password)),
    );
    const controller = new AbortController();
    let heartbeats = 0;
    // Ended by the server (Unavailable) once the pair no longer authenticates; without that,
    // it would send heartbeats for as long as it is held open (cut here 10 s past the grace period).
    const cut = setTimeout(() => controller.abort(), graceEnd + 10_000 - Date.now());
    const ended = await (async () => {
      try {
        for await (const _ of watcher.watchRevocations({ cursor: "" }, { signal: controller.signal }))
          heartbeats++;
        return "ended";
      } catch (err) {
        return controller.signal.aborted ? "still open" : (err as { rawMessage?: string }).rawMessage;
      } finally {
        clearTimeout(cut);
      }
    })();
    expect(heartbeats).toBeGreaterThan(0);
    expect(ended).toMatch(/no longer authenticates/);
    expect(Date.now()).toBeGreaterThanOrEqual(graceEnd);
    // A new call with the pair is refused as the stream's end said.
    await expect(
      authenticatedAs(
        clients(ts.connect(), basic(created.username, created.password)).machines.checkAuthentication({}),
      ),
    ).resolves.toMatchObject({ reason: "TOKEN_REVOKED" });
  });
});
