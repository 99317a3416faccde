import { performance } from "node:perf_hooks";
import { describe, expect, it, vi } from "vitest";
import { TesseraAuthError, type TesseraPrincipal } from "../src/sdk/server/index.js";
import { StreamHolds } from "../src/sdk/server/stream-holds.js";
import { VerifyFlights } from "../src/sdk/server/verify-flights.js";

/**
 * Held streams re-checked after a loss of the revocation watch, with more distinct
 * credentials held than verification slots: the re-checks past the slots wait for one
 * (they were refused, and their streams ended UNAVAILABLE, though Tessera would answer),
 * while an event naming a waiting stream still checks it at once and a released stream's
 * re-check is never asked. The core's VerifyFlights in front of a scripted Tessera.
 */

function principal(id: string): TesseraPrincipal {
  return {
    id: `user-${id}`,
    kind: "user",
    tenantId: "tenant-1",
    scopes: ["ticks:read"],
    credentialKind: "pat",
    credentialId: `pat-${id}`,
    applicationIds: [],
  };
}

const rule = { scopes: ["ticks:read"] };
const tick = () => new Promise((r) => setTimeout(r, 0));
/** A turn of the event loop that fake timers leave alone. */
const turn = () => new Promise((r) => setImmediate(r));

/**
 * Run `body` on fake timers, the verification queue's clock (performance.now) included: the
 * bounds it asserts are of the code's own timing, which a loaded machine would stretch.
 */
async function onFakeClock(body: () => Promise<void>): Promise<void> {
  vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] });
  vi.spyOn(performance, "now").mockImplementation(() => Date.now());
  try {
    await body();
  } finally {
    vi.restoreAllMocks();
    vi.useRealTimers();
  }
}

/** `n` held streams of distinct credentials behind `slots` verification slots; Tessera answers when told. */
async function fixture(
  n: number,
  slots: number,
  o: { watching?: () => boolean; recheckMs?: number; exact?: (p: TesseraPrincipal) => boolean } = {},
) {
  const flights = new VerifyFlights<TesseraPrincipal>(
    slots,
    () => new TesseraAuthError("UNAVAILABLE", "too many credentials are being verified at once"),
  );
  const asked: string[] = [];
  const answers: Array<() => void> = [];
  let manual = false;
  const revoked = new Set<string>();
  const holds = new StreamHolds({
    authenticate: (authorization, _thumbprint, _address, wait) => {
      const id = authorization!.slice("Bearer ".length);
      return flights.answer(
        id,
        0,
        () => {
          asked.push(id);
          const answer = () =>
            revoked.has(id)
              ? Promise.reject(new TesseraAuthError("TOKEN_REVOKED", "credential is revoked"))
              : Promise.resolve(principal(id));
          if (!manual) return answer();
          return new Promise<TesseraPrincipal>((resolve, reject) =>
            answers.push(() => answer().then(resolve, reject)),
          );
        },
        wait,
      );
    },
    watching: o.watching ?? (() => true),
    ...(o.exact ? { exact: o.exact } : {}),
    now: Date.now,
    ...(o.recheckMs ? { recheckMs: o.recheckMs } : {}),
  });
  const held = [];
  for (let i = 0; i < n; i++) held.push(await holds.hold(`Bearer ${i}`, undefined, rule));
  asked.length = 0;
  manual = true;
  /** Tessera answers every call asked so far. */
  const answerAll = () => {
    for (const answer of answers.splice(0)) answer();
  };
  return { flights, holds, held, asked, answerAll, revoked };
}

/** Twenty held streams behind four slots, re-checked every 100 ms while the watch is down, just after a loss. */
async function lostFor100msRechecks(settle = tick) {
  const watch = { up: true };
  const f = await fixture(20, 4, { watching: () => watch.up, recheckMs: 100 });
  watch.up = false;
  f.holds.onLost();
  await settle();
  return { f, watch };
}

const running = (held: { signal: AbortSignal }[]) =>
  held.map((h) => (h.signal.aborted ? (h.signal.reason as TesseraAuthError).reason : "running"));

describe("the SDK's held streams re-checked past the verification slots", () => {
  it("keeps every stream after a loss: the re-checks past the slots wait for one, each credential asked once", async () => {
    const f = await fixture(20, 4);
    f.holds.onLost();
    await tick();
    // Three of the four slots (their share): the fourth stays free for new calls.
    expect(f.asked).toHaveLength(3);
    expect(f.flights.waiting).toBe(17);
    f.revoked.add("13");
    for (let round = 0; round < 5 && f.asked.length < 20; round++) {
      f.answerAll();
      await tick();
    }
    f.answerAll();
    await expect.poll(() => f.held[13]!.signal.aborted).toBe(true);
    expect(f.held[13]!.signal.reason).toMatchObject({ reason: "TOKEN_REVOKED" });
    const states = running(f.held);
    states.splice(13, 1);
    expect(states).toEqual(Array(19).fill("running"));
    expect([...f.asked].sort()).toEqual(Array.from({ length: 20 }, (_, i) => `${i}`).sort());
    expect(f.flights.refused).toBe(0);
  });

  it("checks a waiting stream an event names at once, in the slot the re-checks leave free, not after the others", async () => {
    const f = await fixture(20, 4);
    f.holds.onLost();
    await tick();
    expect(f.flights.waiting).toBe(17);
    f.revoked.add("17");
    f.holds.onEvent("credential", "pat-17");
    await tick();
    await tick();
    // Asked at once (it was refused 503 while the queue held every slot), the others still waiting.
    expect(f.asked).toEqual(["0", "1", "2", "17"]);
    expect(f.flights.waiting).toBe(16);
    f.answerAll();
    await expect.poll(() => f.held[17]!.signal.aborted).toBe(true);
    expect(f.held[17]!.signal.reason).toMatchObject({ reason: "TOKEN_REVOKED" });
    expect(running(f.held).filter((s) => s === "running")).toHaveLength(19);
  });

  it("refuses an event's check 503 at once when every slot is taken, rather than leave it waiting", async () => {
    const f = await fixture(20, 4);
    f.holds.onLost();
    await tick();
    // A new call takes the slot the re-checks leave free.
    void f.flights.answer("new", 0, () => new Promise<TesseraPrincipal>(() => {}));
    f.holds.onEvent("credential", "pat-17");
    await tick();
    await tick();
    expect(f.held[17]!.signal.aborted).toBe(true);
    expect(f.held[17]!.signal.reason).toMatchObject({ reason: "UNAVAILABLE" });
    expect(f.flights.waiting).toBe(16);
    expect(running(f.held).filter((s) => s === "running")).toHaveLength(19);
    expect(f.asked).not.toContain("17");
  });

  it("asks nothing for a stream released in the tick of the loss", async () => {
    const f = await fixture(6, 2);
    f.holds.onLost();
    for (const h of f.held) h.release();
    await tick();
    expect(f.flights.waiting).toBe(0);
    f.answerAll();
    await tick();
    f.answerAll();
    await tick();
    expect(f.asked).toEqual([]);
    expect(f.holds.size).toBe(0);
  });

  it("takes a released stream's re-check out of the queue: Tessera is not asked for it", async () => {
    const f = await fixture(6, 4);
    f.holds.onLost();
    await tick();
    expect(f.flights.waiting).toBe(3);
    f.held[5]!.release();
    expect(f.flights.waiting).toBe(2);
    f.answerAll();
    await tick();
    f.answerAll();
    await expect.poll(() => f.asked.length).toBe(5);
    await tick();
    expect(f.asked).not.toContain("5");
  });

  it("re-checks a stream every recheckMs while the watch stays down at the head of the queue, ahead of the loss's: a revocation (no event) ends it then", async () => {
    const { f } = await lostFor100msRechecks();
    // The first three answered (nothing vouches for them now), three more asked, fourteen waiting.
    f.answerAll();
    await expect.poll(() => f.asked).toHaveLength(6);
    expect(f.flights.waiting).toBe(14);
    f.revoked.add("0");
    // Their periodic re-checks wait (the share is taken; a new call's slot stays free), ahead of the fourteen.
    await expect.poll(() => f.flights.waiting, { timeout: 1000, interval: 5 }).toBe(17);
    expect(f.flights.refused).toBe(0);
    f.answerAll();
    await expect.poll(() => f.asked).toHaveLength(9);
    expect(f.asked.slice(6).sort()).toEqual(["0", "1", "2"]);
    f.answerAll();
    await expect.poll(() => f.held[0]!.signal.aborted, { timeout: 1000 }).toBe(true);
    expect(f.held[0]!.signal.reason).toMatchObject({ reason: "TOKEN_REVOKED" });
    for (const h of f.held) h.release();
  });

  it("ends a stream whose periodic re-check waited past the queue's deadline, saturated: within 6/5 recheckMs + 5 s of its last answer", () =>
    onFakeClock(async () => {
      // Every periodic timer at the middle of its window: 110 ms.
      vi.spyOn(Math, "random").mockReturnValue(0.5);
      const { f } = await lostFor100msRechecks(turn);
      // The first three answered; from now on Tessera answers nothing: the slots stay taken.
      f.answerAll();
      const answered = Date.now();
      let ended = Number.NaN;
      f.held[0]!.signal.addEventListener("abort", () => {
        ended = Date.now() - answered;
      });
      await turn();
      expect(f.asked).toHaveLength(6);
      // Their periodic re-checks wait at the head of the queue rather than being refused at once.
      await vi.advanceTimersByTimeAsync(120);
      expect(f.flights.waiting).toBe(17);
      expect(f.flights.refused).toBe(0);
      await vi.advanceTimersByTimeAsync(6000);
      // Refused only once it waited the whole deadline, after its timer's 110 ms.
      expect(ended).toBeGreaterThanOrEqual(110 + 5000);
      expect(ended).toBeLessThanOrEqual(120 + 5000);
      expect(f.held[0]!.signal.reason).toMatchObject({ reason: "UNAVAILABLE" });
      for (const h of f.held) h.release();
    }));

  it("times its periodic re-checks at random between recheckMs and 6/5 of it, so that they do not come in bursts", () =>
    onFakeClock(async () => {
      // Nothing vouches for them: each stream's timer is armed as it is admitted, all in one instant.
      const f = await fixture(40, 64, { watching: () => false, recheckMs: 500 });
      const armed = Date.now();
      const at = new Map<string, number>();
      // Each stream's periodic re-check, as it is asked of Tessera.
      for (let ms = 0; ms < 700; ms++) {
        await vi.advanceTimersByTimeAsync(1);
        for (const id of f.asked.splice(0)) if (!at.has(id)) at.set(id, Date.now() - armed);
      }
      const times = [...at.values()].sort((a, b) => a - b);
      expect(times).toHaveLength(40);
      expect(times[0]).toBeGreaterThanOrEqual(500);
      expect(times.at(-1)).toBeLessThanOrEqual(600);
      // Spread over the window, not one burst.
      expect(times.at(-1)! - times[0]!).toBeGreaterThan(40);
      expect(f.flights.refused).toBe(0);
      for (const h of f.held) h.release();
    }));

  it("lets the periodic re-check wait once the watch is back (it replays what it missed): the routine loss cuts no stream", async () => {
    const { f, watch } = await lostFor100msRechecks();
    watch.up = true;
    f.answerAll();
    await expect.poll(() => f.asked).toHaveLength(6);
    // The first three's periodic re-checks come while the slots are still taken: they queue.
    await new Promise((r) => setTimeout(r, 200));
    expect(f.flights.waiting).toBe(17);
    for (let round = 0; round < 20 && f.flights.waiting > 0; round++) {
      f.answerAll();
      await tick();
    }
    f.answerAll();
    expect(running(f.held)).toEqual(Array(20).fill("running"));
    expect(f.flights.refused).toBe(0);
    for (const h of f.held) h.release();
  });

  it("queues the periodic re-check of a stream the watch cannot vouch for behind a loss's while the watch is up, not ahead of them", async () => {
    const watch = { up: true };
    // Stream 0's credential is one the watch never vouches for (see `exact`): re-checked every 100 ms.
    const f = await fixture(20, 4, {
      watching: () => watch.up,
      recheckMs: 100,
      exact: (p) => p.id === "user-0",
    });
    // A loss, the watch back at once: the nineteen others are re-checked, three asked, sixteen waiting.
    watch.up = false;
    f.holds.onLost();
    watch.up = true;
    await tick();
    expect(f.asked).toHaveLength(3);
    expect(f.asked).not.toContain("0");
    // Stream 0's periodic re-check comes while they wait: it queues behind them.
    await expect.poll(() => f.flights.waiting, { timeout: 1000, interval: 5 }).toBe(17);
    for (let round = 0; round < 20 && !f.asked.includes("0"); round++) {
      f.answerAll();
      await tick();
    }
    expect(f.asked.indexOf("0")).toBe(19);
    f.answerAll();
    expect(f.flights.refused).toBe(0);
    for (const h of f.held) h.release();
  });
});
