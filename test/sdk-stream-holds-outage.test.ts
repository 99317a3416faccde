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

/** Tessera: held credentials valid after `latencyMs`, junk refused after `junkMs`. */
function fakeTessera(latencyMs: number, junkMs = 1000) {
  const streams: FakeStream[] = [];
  const transport = createRouterTransport(({ service }) =>
    service(VerificationService, {
      async verifyCredential(req) {
        const junk = req.credential.startsWith("junk");
        await sleep(junk ? junkMs : latencyMs);
        return junk ? { valid: false, code: VerificationCode.NOT_FOUND } : valid(req.credential);
      },
      async *watchRevocations(_req, ctx) {
        const stream = new FakeStream();
        streams.push(stream);
        yield* stream.messages(ctx.signal);
      },
    }),
  );
  return { streams, transport };
}

const rule = { scopes: ["ticks:read"] };
const state = (h: StreamHold) =>
  h.signal.aborted ? (h.signal.reason as { reason: string }).reason : "running";

describe("the SDK's held streams while nothing vouches for them", () => {
  let auth: TesseraAuth | undefined;
  afterEach(() => auth?.close());

  function setup(o: { latencyMs: number; max?: number; watch: boolean }) {
    const { streams, transport } = fakeTessera(o.latencyMs);
    const lines: string[] = [];
    const a = createTesseraAuth({
      server: "https://tessera.invalid",
      transport,
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
    return { a, streams, lines, holdMany };
  }

  for (const mode of ["the watch down", "watch: false"] as const)
    it(`keeps held streams while an unauthenticated caller floods new calls with distinct junk credentials (${mode})`, async () => {
      const s = setup({ latencyMs: 0, max: 8, watch: mode === "the watch down" });
      const holds = await s.holdMany(4, 4);
      expect(s.a.watching()).toBe(false);
      // Distinct junk credentials Tessera takes 1 s to refuse: every slot a new call may take stays taken.
      let stop = false;
      let sent = 0;
      const flood = (async () => {
        while (!stop) {
          void s.a.authenticate(`Bearer junk-${sent++}`).catch(() => {});
          await sleep(5);
        }
      })();
      // Two periodic re-checks of each stream (every 5 to 6 s).
      await sleep(12_500);
      stop = true;
      await flood;
      expect(holds.map(state)).toEqual(Array(4).fill("running"));
      expect(s.a.stats().verifyRefused).toBeGreaterThan(100);
      expect(s.lines.filter((l) => l.startsWith("held streams ended"))).toEqual([]);
      for (const h of holds) h.release();
    }, 30_000);

  it("keeps 10,000 held streams through a watch outage at the default cap: their periodic re-checks wait rather than come in a burst refused 503", async () => {
    const s = setup({ latencyMs: 20, watch: true });
    await expect.poll(() => s.streams.length).toBeGreaterThan(0);
    s.streams[0]!.push({ cursor: "c1", heartbeatSeconds: 30 });
    expect(await s.a.ready(2000)).toBe(true);
    const holds = await s.holdMany(10_000, 200);
    // Lost, and not back: the reconnected stream sends nothing.
    s.streams[0]!.push(new ConnectError("the stream's hour is up", Code.Unavailable));
    await expect.poll(() => s.a.watching()).toBe(false);
    // The loss's re-checks, then rounds of periodic ones.
    await sleep(16_000);
    const ended = holds.filter((h) => h.signal.aborted).map(state);
    expect(ended).toEqual([]);
    expect(s.a.stats().verifyRefused).toBe(0);
    for (const h of holds) h.release();
  }, 60_000);
});
