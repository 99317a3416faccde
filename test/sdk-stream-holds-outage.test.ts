import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { afterEach, describe, expect, it } from "vitest";
import {
  VerificationCode,
  VerificationService,
  VerifiedPrincipalKind,
  type VerifyCredentialResponseSchema,
} from "../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuth, type StreamHold, type TesseraAuth } from "../src/sdk/server/index.js";
import { FakeStream } from "./sdk-fake-watch.js";

/**
 * Held streams while nothing vouches for them (the watch down, or `watch: false`), through
 * the real core: their re-check every 5 s waits for a verification slot at the head of the
 * queue, so neither the re-checks' own bursts nor anyone's junk credentials end them 503.
 */

type Answer = MessageInitShape<typeof VerifyCredentialResponseSchema>;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const valid = (cred: string): Answer => ({
  valid: true,
  code: VerificationCode.VALID,
  principalId: `user-${cred}`,
  principalKind: VerifiedPrincipalKind.USER,
  tenantId: "tenant-1",
  scopes: ["ticks:read"],
  credentialId: `cid-${cred}`,
  credentialKind: "pat",
});

/**
 * Tessera: held credentials valid after `latencyMs` (0: at once, without leaving the turn),
 * junk refused after `junkMs`; the latency is read as each call arrives, so a test may change it.
 */
function fakeTessera(latencyMs: number, junkMs = 1000) {
  const streams: FakeStream[] = [];
  const tessera = {
    streams,
    latencyMs,
    /** The credentials asked, in order. */
    asked: [] as string[],
    /** Called as each call arrives. */
    onAsk: () => {},
    transport: createRouterTransport(({ service }) =>
      service(VerificationService, {
        async verifyCredential(req) {
          tessera.asked.push(req.credential);
          tessera.onAsk();
          const junk = req.credential.startsWith("junk");
          const ms = junk ? junkMs : tessera.latencyMs;
          if (ms > 0) await sleep(ms);
          return junk ? { valid: false, code: VerificationCode.NOT_FOUND } : valid(req.credential);
        },
        async *watchRevocations(_req, ctx) {
          const stream = new FakeStream();
          streams.push(stream);
          yield* stream.messages(ctx.signal);
        },
      }),
    ),
  };
  return tessera;
}

const rule = { scopes: ["ticks:read"] };
const state = (h: StreamHold) =>
  h.signal.aborted ? (h.signal.reason as { reason: string }).reason : "running";

describe("the SDK's held streams while nothing vouches for them", () => {
  let auth: TesseraAuth | undefined;
  afterEach(() => auth?.close());

  function setup(o: { latencyMs: number; max?: number; watch: boolean }) {
    const tessera = fakeTessera(o.latencyMs);
    const { streams } = tessera;
    const lines: string[] = [];
    const a = createTesseraAuth({
      server: "https://tessera.invalid",
      transport: tessera.transport,
      watchBackoffMs: { min: 20, max: 40 },
      ...(o.max ? { maxConcurrentVerifications: o.max } : {}),
      ...(o.watch ? {} : { watch: false }),
      jwt: { verify: "online" },
      logger: { warn: (_o, m) => lines.push(m), error: (_o, m) => lines.push(m), info: () => {} },
      fetchJson: async () => ({ keys: [] }),
    });
    auth = a;
    const holdMany = async (n: number, batch: number) => {
      const holds: StreamHold[] = [];
      for (let i = 0; i < n; i += batch) {
        const calls = [];
        for (let j = i; j < Math.min(n, i + batch); j++)
          calls.push(a.holdStream(`Bearer cred-${j}`, undefined, rule));
        holds.push(...(await Promise.all(calls)));
      }
      return holds;
    };
    /** Until every stream has been asked of Tessera `times` more since `since` (its length of `asked`), or ended. */
    const rechecked = (holds: StreamHold[], since: number, times: number, timeout: number) => {
      const asked = (j: number) => tessera.asked.slice(since).filter((c) => c === `cred-${j}`).length;
      return expect
        .poll(() => holds.every((h, j) => h.signal.aborted || asked(j) >= times), { timeout, interval: 100 })
        .toBe(true);
    };
    return { a, tessera, streams, lines, holdMany, rechecked };
  }

  for (const mode of ["the watch down", "watch: false"] as const)
    it(`keeps held streams while an unauthenticated caller floods new calls with distinct junk credentials (${mode})`, async () => {
      const s = setup({ latencyMs: 0, max: 8, watch: mode === "the watch down" });
      const holds = await s.holdMany(4, 4);
      expect(s.a.watching()).toBe(false);
      // Distinct junk credentials Tessera takes 1 s to refuse: every slot a new call may take stays taken.
      let stop = false;
      let sent = 0;
      const since = s.tessera.asked.length;
      const flood = (async () => {
        while (!stop) {
          void s.a.authenticate(`Bearer junk-${sent++}`).catch(() => {});
          await sleep(5);
        }
      })();
      // Two periodic re-checks of each stream (every 5 to 6 s), each asked of Tessera.
      await s.rechecked(holds, since, 2, 20_000);
      stop = true;
      await flood;
      expect(holds.map(state)).toEqual(Array(4).fill("running"));
      expect(s.a.stats().verifyRefused).toBeGreaterThan(100);
      expect(s.lines.filter((l) => l.startsWith("held streams ended"))).toEqual([]);
      for (const h of holds) h.release();
    }, 30_000);

  it("keeps held streams through a watch outage when their periodic re-checks come together past the slots: they wait rather than being refused 503", async () => {
    // Four slots, three of them for re-checks: twenty-four streams are far more than the slots.
    const n = 24;
    const s = setup({ latencyMs: 0, max: 4, watch: true });
    await expect.poll(() => s.streams.length).toBeGreaterThan(0);
    s.streams[0]!.push({ cursor: "c1", heartbeatSeconds: 30 });
    expect(await s.a.ready(2000)).toBe(true);
    const holds = await s.holdMany(n, 4);
    s.tessera.asked.length = 0;
    // Lost, and not back: the reconnected stream sends nothing.
    s.streams[0]!.push(new ConnectError("the stream's hour is up", Code.Unavailable));
    await expect.poll(() => s.a.watching()).toBe(false);
    // The loss's re-checks, answered at once: every stream's periodic timer starts in the same instant.
    await expect.poll(() => s.tessera.asked.length).toBe(n);
    // From now on each answer holds its slot a while, so the periodic re-checks queue for the slots.
    s.tessera.latencyMs = 200;
    let waited = 0;
    s.tessera.onAsk = () => {
      waited = Math.max(waited, s.a.stats().verifyWaiting);
    };
    // Each stream's periodic re-check, after the loss's, asked of Tessera.
    await s.rechecked(holds, 0, 2, 15_000);
    const ended = holds.filter((h) => h.signal.aborted).map(state);
    expect(ended).toEqual([]);
    expect(s.a.stats().verifyRefused).toBe(0);
    // They did come past the slots: some waited for one.
    expect(waited).toBeGreaterThan(0);
    for (const h of holds) h.release();
  }, 30_000);
});
