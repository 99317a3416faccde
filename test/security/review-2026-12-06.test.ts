import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { createTesseraAuth, type TesseraAuth } from "../../src/sdk/server/index.js";
import { DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * The adversarial review of 2026-12-06 (issue 22: the surfaces other services verify
 * callers with), against a real server over TLS: each test is a finding of that review,
 * failing on the main it was found on, and holds with its fix.
 */
describe.each(DATABASES)("review 2026-12-06 on $name", (db) => {
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

  it("SDK: a call made after a revocation event never joins a VerifyCredential asked before it, nor caches its VALID", async () => {
    const admin = clients(ts.connect(), root);
    const tenantId = (await admin.tenants.createTenant({ name: `flight-${short()}` })).tenant!.id;
    const machine = (name: string, scopes: string[]) =>
      admin.machines.createMachineUser({ tenantId, name, authType: MachineAuthType.BEARER, scopes });
    const verifier = (await machine(`verifier-${short()}`, ["auth:verify"])).token;
    const victim = await machine(`victim-${short()}`, ["workflows:read"]);

    // Tessera's VerifyCredential answers reach the service only once `gate` opens: the
    // network between them is slow, as it may be.
    const answered: (() => void)[] = [];
    let gate: Promise<void> | undefined;
    const slowAnswers: Interceptor = (next) => async (req) => {
      const res = await next(req);
      if (req.method.name === "VerifyCredential" && gate !== undefined) {
        for (const f of answered.splice(0)) f();
        await gate;
      }
      return res;
    };
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      transport: createGrpcTransport({
        baseUrl: ts.server.url,
        nodeOptions: { ca: readFileSync(join(ts.certs.dir, "ca.crt")) },
        interceptors: [slowAnswers],
      }),
    });
    cores.push(auth);
    expect(await auth.ready(10_000)).toBe(true);

    let open: () => void = () => {};
    gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    const firstAnswered = new Promise<void>((resolve) => answered.push(resolve));
    // Tessera answers VALID; the answer is on its way when the machine user is deleted.
    const before = auth.authenticate(`Bearer ${victim.token}`);
    await firstAnswered;
    const events = auth.stats().watch!.events;
    await admin.machines.deleteMachineUser({ id: victim.machineUser!.id });
    await expect.poll(() => auth.stats().watch!.events, { timeout: 10_000 }).toBeGreaterThan(events);

    // A call after the event: Tessera answers it afresh (a deleted machine user's token is unknown).
    const after = auth.authenticate(`Bearer ${victim.token}`);
    gate = undefined;
    open();
    expect((await before).id).toBe(victim.machineUser!.id);
    await expect(after).rejects.toMatchObject({ reason: "CREDENTIALS_INVALID" });
    // And nothing revoked stays cached: the next call is refused too.
    expect(auth.stats().cacheSize).toBe(0);
    await expect(auth.authenticate(`Bearer ${victim.token}`)).rejects.toMatchObject({
      reason: "CREDENTIALS_INVALID",
    });
  });

  it("SDK: an answer asked before the revocation stream first came up is not cached by a call joining it", async () => {
    const admin = clients(ts.connect(), root);
    const tenantId = (await admin.tenants.createTenant({ name: `cold-${short()}` })).tenant!.id;
    const machine = (name: string, scopes: string[]) =>
      admin.machines.createMachineUser({ tenantId, name, authType: MachineAuthType.BEARER, scopes });
    const verifier = (await machine(`verifier-${short()}`, ["auth:verify"])).token;
    const victim = await machine(`victim-${short()}`, ["workflows:read"]);

    // The stream opens only once `streamGate` does; VerifyCredential answers reach the
    // service only once `answerGate` does.
    let openStream: () => void = () => {};
    const streamGate = new Promise<void>((resolve) => {
      openStream = resolve;
    });
    let openAnswers: () => void = () => {};
    let answerGate: Promise<void> | undefined = new Promise<void>((resolve) => {
      openAnswers = resolve;
    });
    let answered: () => void = () => {};
    const firstAnswered = new Promise<void>((resolve) => {
      answered = resolve;
    });
    const slow: Interceptor = (next) => async (req) => {
      if (req.method.name === "WatchRevocations") await streamGate;
      const res = await next(req);
      if (req.method.name === "VerifyCredential" && answerGate !== undefined) {
        answered();
        await answerGate;
      }
      return res;
    };
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier,
      transport: createGrpcTransport({
        baseUrl: ts.server.url,
        nodeOptions: { ca: readFileSync(join(ts.certs.dir, "ca.crt")) },
        interceptors: [slow],
      }),
    });
    cores.push(auth);

    // Asked (and answered VALID) while the stream is not up; then the machine user is
    // deleted, and only then does the stream start, from now: it never names the victim.
    const before = auth.authenticate(`Bearer ${victim.token}`);
    await firstAnswered;
    await admin.machines.deleteMachineUser({ id: victim.machineUser!.id });
    openStream();
    expect(await auth.ready(10_000)).toBe(true);
    const after = auth.authenticate(`Bearer ${victim.token}`);
    answerGate = undefined;
    openAnswers();
    expect((await before).id).toBe(victim.machineUser!.id);
    await expect(after).rejects.toMatchObject({ reason: "CREDENTIALS_INVALID" });
    expect(auth.stats().cacheSize).toBe(0);
    await expect(auth.authenticate(`Bearer ${victim.token}`)).rejects.toMatchObject({
      reason: "CREDENTIALS_INVALID",
    });
  });
});
