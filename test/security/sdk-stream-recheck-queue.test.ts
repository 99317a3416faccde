import { join } from "node:path";
import type { Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MachineAuthType } from "../../gen/tessera/v1/machine_user_service_pb.js";
import {
  createTesseraAuth,
  type StreamHold,
  type TesseraAuth,
  type TesseraAuthError,
  type TesseraAuthStats,
} from "../../src/sdk/server/index.js";
import { DbProxy } from "../db-proxy.js";
import { SQLITE, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, clients, short } from "../machine-fixtures.js";

/**
 * When the revocation watch is lost (Tessera ends each WatchRevocations stream every
 * `server.maxStreamSeconds`, an hour by default; or the network), every held stream it
 * vouched for is verified again through Tessera at once. Those past
 * `maxConcurrentVerifications` distinct credentials were refused by the SDK's own bound, and
 * their streams ended UNAVAILABLE though Tessera still admitted them: a service holding more
 * streams of distinct credentials than the bound lost the rest at every routine loss. They
 * wait for a verification slot now, first in first out, for up to 5 s; each credential is
 * asked once (no retries); a revoked one still ends, at once when an event names it. They
 * fly in at most 3/4 of the slots: the rest stay free, so that a new call, or an event's
 * re-check, is answered meanwhile rather than refused 503 until the queue drains.
 *
 * Real Tessera over TLS: VerifyCredential through one proxy (frozen: Tessera answering
 * slowly, so the slots stay taken), WatchRevocations through another (cut: the watch lost).
 */

const SLOTS = 4;
/** The slots re-checks may fly in (3/4 of them): the fourth stays free for new calls and urgent re-checks. */
const SHARE = 3;
const CALLERS = 20;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const states = (holds: StreamHold[]) =>
  holds.map((h) => (h.signal.aborted ? (h.signal.reason as TesseraAuthError).reason : "running"));

/** Whether every stream but the `ended`th runs. */
const runningBut = (holds: StreamHold[], ended: number) =>
  states(holds).every((s, i) => i === ended || s === "running");

describe("SDK: held streams re-checked after a loss of the revocation watch, past maxConcurrentVerifications", () => {
  let ts: TestServer;
  let verifyProxy: DbProxy;
  let watchProxy: DbProxy;
  let admin: ReturnType<typeof clients>;
  let tenantId: string;
  let verifierToken: string;

  async function callers(n: number) {
    const made = [];
    for (let i = 0; i < n; i++) {
      const created = await admin.machines.createMachineUser({
        tenantId,
        name: `queue-caller-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["ticks:read"],
      });
      made.push({ token: created.token, id: created.machineUser!.id });
    }
    return made;
  }

  /** A core with `SLOTS` verification slots whose Tessera the proxies stand between, and its log. */
  async function core(): Promise<{ auth: TesseraAuth; warnings: { obj: object; msg: string }[] }> {
    const warnings: { obj: object; msg: string }[] = [];
    const tessera = (port: number): Transport =>
      createGrpcTransport({ baseUrl: `https://localhost:${port}`, nodeOptions: { ca: ts.certs.ca } });
    const toVerify = tessera(verifyProxy.port);
    const toWatch = tessera(watchProxy.port);
    const auth = createTesseraAuth({
      server: ts.server.url,
      caFile: join(ts.certs.dir, "ca.crt"),
      credential: verifierToken,
      maxConcurrentVerifications: SLOTS,
      // A frozen Tessera keeps its calls (and their slots) until the test restores it.
      verifyTimeoutMs: 30_000,
      watchBackoffMs: { min: 50, max: 100 },
      transport: { unary: toVerify.unary.bind(toVerify), stream: toWatch.stream.bind(toWatch) },
      logger: { warn: (obj, msg) => warnings.push({ obj, msg }), error: () => {} },
    });
    expect(await auth.ready(10_000)).toBe(true);
    return { auth, warnings };
  }

  /**
   * `body` with the streams of twenty new callers held on a new core (the first `doubled`
   * of them held twice) and its stats before; then the proxies restored, the streams
   * released and the core closed. Returns what the core logged.
   */
  async function scene(
    doubled: number,
    body: (s: {
      who: { token: string; id: string }[];
      auth: TesseraAuth;
      holds: StreamHold[];
      before: TesseraAuthStats;
    }) => Promise<void>,
  ) {
    const who = await callers(CALLERS);
    const { auth, warnings } = await core();
    const holds: StreamHold[] = [];
    for (const c of [...who, ...who.slice(0, doubled)])
      holds.push(await auth.holdStream(`Bearer ${c.token}`, undefined, { scopes: ["ticks:read"] }));
    try {
      await body({ who, auth, holds, before: auth.stats() });
    } finally {
      verifyProxy.restore();
      watchProxy.restore();
      for (const h of holds) h.release();
      auth.close();
    }
    return warnings;
  }

  beforeAll(async () => {
    ts = await startTestServer(SQLITE);
    verifyProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    watchProxy = await DbProxy.start({ host: "127.0.0.1", port: ts.server.port });
    admin = clients(ts.connect(), await adminLogin(ts.connect()));
    tenantId = (await admin.tenants.createTenant({ name: `queue-${short()}` })).tenant!.id;
    verifierToken = (
      await admin.machines.createMachineUser({
        tenantId,
        name: `queue-service-${short()}`,
        authType: MachineAuthType.BEARER,
        scopes: ["auth:verify"],
      })
    ).token;
  }, 120_000);

  afterAll(async () => {
    verifyProxy?.restore();
    watchProxy?.restore();
    await verifyProxy?.close();
    await watchProxy?.close();
    await ts?.close();
  });

  it("keeps every stream Tessera still admits, ends the one it now refuses, and asks Tessera once per distinct credential", async () => {
    // Twenty distinct credentials, four of them held by two streams each.
    await scene(4, async ({ who, auth, holds, before }) => {
      // Tessera answers slowly, and the watch is lost: every stream is re-checked at once.
      verifyProxy.freeze();
      watchProxy.cut();
      // Three credentials asked (their second streams joining), seventeen waiting for a slot
      // (they were refused, their streams ended UNAVAILABLE), every stream running.
      await expect.poll(() => auth.stats().verifyCalls - before.verifyCalls).toBe(SHARE);
      await sleep(200);
      expect(states(holds)).toEqual(Array(holds.length).fill("running"));
      // Seventeen credentials waiting, the fourth doubled one with both its streams.
      expect(auth.stats().verifyWaiting).toBe(CALLERS - SHARE + 1);
      // Meanwhile the last caller is disabled: its re-check, still waiting, is asked after this.
      await admin.machines.updateMachineUser({ id: who[CALLERS - 1]!.id, disabled: true });
      verifyProxy.restore();
      await expect.poll(() => holds[CALLERS - 1]!.signal.aborted).toBe(true);
      expect(holds[CALLERS - 1]!.signal.reason).toMatchObject({ reason: "PRINCIPAL_DISABLED" });
      await expect.poll(() => auth.stats().verifyCalls - before.verifyCalls).toBe(CALLERS);
      expect(runningBut(holds, CALLERS - 1)).toBe(true);
      // Each distinct credential asked once: nothing was retried, nothing refused.
      await sleep(300);
      const after = auth.stats();
      expect(after.verifyCalls - before.verifyCalls).toBe(CALLERS);
      expect(after.verifyRefused - before.verifyRefused).toBe(0);
      expect(after.verifyWaiting).toBe(0);
    });
  });

  it("checks a waiting stream at once when a revocation event names it, in the slot kept free, while the others keep waiting", async () => {
    await scene(0, async ({ who, auth, holds, before }) => {
      verifyProxy.freeze();
      // The routine end of the watch: lost, and back up at once.
      watchProxy.cut();
      watchProxy.restore();
      await expect.poll(() => auth.stats().verifyCalls - before.verifyCalls).toBe(SHARE);
      expect(await auth.ready(10_000)).toBe(true);
      expect(states(holds)).toEqual(Array(CALLERS).fill("running"));
      expect(auth.stats().verifyWaiting).toBe(CALLERS - SHARE);
      // Tessera's event for a caller whose re-check waits behind the others'.
      await admin.machines.updateMachineUser({ id: who[12]!.id, disabled: true });
      // Asked now, in the slot the re-checks leave free (it was refused 503, every slot taken).
      await expect
        .poll(() => auth.stats().verifyCalls - before.verifyCalls, { timeout: 4000, interval: 20 })
        .toBe(SHARE + 1);
      expect(auth.stats().verifyWaiting).toBe(CALLERS - SHARE - 1);
      expect(states(holds)).toEqual(Array(CALLERS).fill("running"));
      verifyProxy.restore();
      await expect.poll(() => holds[12]!.signal.aborted).toBe(true);
      expect(holds[12]!.signal.reason).toMatchObject({ reason: "PRINCIPAL_DISABLED" });
      await expect.poll(() => auth.stats().verifyWaiting).toBe(0);
      await expect.poll(() => auth.stats().verifyCalls - before.verifyCalls).toBe(CALLERS);
      await sleep(300);
      expect(runningBut(holds, 12)).toBe(true);
      expect(auth.stats().verifyCalls - before.verifyCalls).toBe(CALLERS);
      expect(auth.stats().verifyRefused - before.verifyRefused).toBe(0);
    });
  });

  it("answers a new call while the re-checks wait, in the slot they leave free, and refuses 503 only past it", async () => {
    const [fresh, other] = await callers(2);
    await scene(0, async ({ auth, holds, before }) => {
      verifyProxy.freeze();
      watchProxy.cut();
      watchProxy.restore();
      await expect.poll(() => auth.stats().verifyWaiting).toBe(CALLERS - SHARE);
      // A new caller is asked at once (it was refused 503 until the queue drained)...
      const admitted = auth.authenticate(`Bearer ${fresh!.token}`);
      await expect.poll(() => auth.stats().verifyCalls - before.verifyCalls).toBe(SHARE + 1);
      // ...and one more, with every slot taken, is refused at once, as ever.
      await expect(auth.authenticate(`Bearer ${other!.token}`)).rejects.toMatchObject({
        reason: "UNAVAILABLE",
      });
      verifyProxy.restore();
      expect((await admitted).id).toBe(fresh!.id);
      await expect.poll(() => auth.stats().verifyWaiting).toBe(0);
      expect(states(holds)).toEqual(Array(CALLERS).fill("running"));
      expect(auth.stats().verifyRefused - before.verifyRefused).toBe(1);
    });
  });

  it("ends the re-checks still waiting at the deadline UNAVAILABLE, counted and reported once, without asking again", async () => {
    const warnings = await scene(0, async ({ auth, holds, before }) => {
      verifyProxy.freeze();
      const lost = Date.now();
      watchProxy.cut();
      await expect.poll(() => auth.stats().verifyCalls - before.verifyCalls).toBe(SHARE);
      // They wait: a second in, every stream still runs.
      await sleep(1000);
      expect(states(holds)).toEqual(Array(CALLERS).fill("running"));
      expect(auth.stats().verifyWaiting).toBe(CALLERS - SHARE);
      await expect
        .poll(() => states(holds).filter((s) => s !== "running").length, { timeout: 15_000 })
        .toBe(CALLERS - SHARE);
      expect(Date.now() - lost).toBeGreaterThanOrEqual(4500);
      expect(states(holds).slice(SHARE)).toEqual(Array(CALLERS - SHARE).fill("UNAVAILABLE"));
      const after = auth.stats();
      expect(after.verifyRefused - before.verifyRefused).toBe(CALLERS - SHARE);
      expect(after.verifyCalls - before.verifyCalls).toBe(SHARE);
      expect(after.verifyWaiting).toBe(0);
      // The three in flight are answered once Tessera is: their streams run on.
      verifyProxy.restore();
      await sleep(500);
      expect(states(holds).slice(0, SHARE)).toEqual(Array(SHARE).fill("running"));
      expect(auth.stats().verifyCalls - before.verifyCalls).toBe(SHARE);
    });
    // One line for the lot (written at close, the interval's end), with their count.
    const lines = warnings.filter((w) => /maxConcurrentVerifications/.test(w.msg));
    expect(lines).toHaveLength(1);
    expect(lines[0]!.msg).toMatch(/re-check waited/);
    expect(lines[0]!.obj).toMatchObject({ count: CALLERS - SHARE });
  });
});
