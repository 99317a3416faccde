import { join } from "node:path";
import type { Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { createTesseraAuth, type StreamHold, type TesseraAuth } from "../../src/sdk/server/index.js";
import { DbProxy } from "../db-proxy.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * When the revocation watch is lost, every stream it vouched for is verified again through
 * Tessera at once. Tessera ends each WatchRevocations stream every `server.maxStreamSeconds`
 * (an hour by default), and anyone between the service and Tessera can reset it, so this
 * happens routinely. The re-checks past `maxConcurrentVerifications` were refused by the
 * core's own bound and their streams ended Unavailable, though Tessera answered and still
 * admitted their credentials: a service holding more streams of distinct credentials than
 * the bound lost the rest each time. Such a re-check is tried again now; a stream whose
 * credential Tessera refuses still ends.
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("SDK: held streams re-checked after a loss of the revocation watch", () => {
  let ts: TestServer;
  let watchProxy: DbProxy;
  let core: TesseraAuth;
  let admin: ReturnType<typeof clients>;
  let tenantId: string;

  async function machine(scopes: string[]) {
    const created = await admin.machines.createMachineUser({
      tenantId,
      name: `recheck-${short()}`,
      authType: MachineAuthType.BEARER,
      scopes,
    });
    return { token: created.token, id: created.machineUser!.id };
  }

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    watchProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    admin = clients(ts.connect(), await adminLogin(ts.connect()));
    tenantId = (await admin.tenants.createTenant({ name: `recheck-${short()}` })).tenant!.id;
    const verifier = await machine(["auth:verify"]);
    const tessera = (port: number): Transport =>
      createGrpcTransport({ baseUrl: `https://localhost:${port}`, nodeOptions: { ca: ts.certs.ca } });
    // VerifyCredential direct; WatchRevocations through a proxy the one between them can reset.
    const toVerify = tessera(ts.server.port);
    const toWatch = tessera(watchProxy.port);
    core = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifier.token,
      maxConcurrentVerifications: 2,
      watchBackoffMs: { min: 50, max: 100 },
      transport: { unary: toVerify.unary.bind(toVerify), stream: toWatch.stream.bind(toWatch) },
    });
    expect(await core.ready(10_000)).toBe(true);
  }, 120_000);

  afterAll(async () => {
    core?.close();
    await watchProxy?.close();
    await ts?.close();
  });

  it("keeps every stream Tessera still admits, past maxConcurrentVerifications, and ends the one it refuses", async () => {
    const callers = [];
    for (let i = 0; i < 6; i++) callers.push(await machine(["ticks:read"]));
    const holds: StreamHold[] = [];
    for (const c of callers)
      holds.push(await core.holdStream(`Bearer ${c.token}`, undefined, { scopes: ["ticks:read"] }));
    const before = core.stats().verifyCalls;
    // The watch is reset; meanwhile one caller is disabled.
    watchProxy.cut();
    await admin.machines.updateMachineUser({ id: callers[0]!.id, disabled: true });
    await sleep(200);
    watchProxy.restore();
    expect(await core.ready(10_000)).toBe(true);
    await expect.poll(() => holds[0]!.signal.aborted, { timeout: 10_000 }).toBe(true);
    expect(holds[0]!.signal.reason).toMatchObject({ reason: "PRINCIPAL_DISABLED" });
    await sleep(500);
    expect(
      holds.slice(1).map((h) => (h.signal.aborted ? (h.signal.reason as Error).message : "running")),
    ).toEqual(Array(5).fill("running"));
    // Each asked Tessera again.
    await expect.poll(() => core.stats().verifyCalls - before, { timeout: 10_000 }).toBeGreaterThanOrEqual(6);
    for (const h of holds) h.release();
  });
});
