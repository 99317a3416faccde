import { createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import {
  RevocationKind,
  VerificationCode,
  VerificationService,
  VerifiedPrincipalKind,
} from "../gen/tessera/v1/verification_service_pb.js";
import { createTesseraAuth, type TesseraAuthError } from "../src/sdk/server/index.js";
import { type FlightRefusal, VerifyFlights } from "../src/sdk/server/verify-flights.js";
import { FakeStream } from "./sdk-fake-watch.js";

/**
 * The core's verifications in flight on their own: at most `max` distinct credentials asked
 * at once, a call past it refused at once, except a call that may wait (a held stream's
 * re-check), which waits first in first out for a flight to end, up to a deadline.
 */

function deferred<T>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((res) => {
    resolve = res;
  });
  return { promise, resolve };
}

/** Flights whose answers the test gives, recording what was asked and how many asks were at Tessera at once. */
function scripted(max: number, waitMs = 60_000) {
  const asked: string[] = [];
  /** Each credential's asks not answered yet, oldest first. */
  const answers = new Map<string, ReturnType<typeof deferred<string>>[]>();
  const refusals: FlightRefusal[] = [];
  const tessera = { atOnce: 0, peak: 0 };
  const flights = new VerifyFlights<string>(
    max,
    (why) => {
      refusals.push(why);
      return new Error(`refused: ${why}`);
    },
    waitMs,
  );
  const answer = (credential: string, wait?: { signal?: AbortSignal; first?: boolean }, epoch = 0) =>
    flights.answer(
      credential,
      epoch,
      () => {
        asked.push(credential);
        tessera.peak = Math.max(tessera.peak, ++tessera.atOnce);
        const d = deferred<string>();
        answers.set(credential, [...(answers.get(credential) ?? []), d]);
        return d.promise.finally(() => tessera.atOnce--);
      },
      wait,
    );
  /** Tessera answers the oldest ask for `credential` it has not answered. */
  const settle = (credential: string) => answers.get(credential)!.shift()!.resolve(`answer ${credential}`);
  return { flights, asked, refusals, answer, settle, tessera };
}

const tick = () => new Promise((r) => setTimeout(r, 0));

describe("the SDK's verifications in flight", () => {
  it("gives a call that may wait the next free slot, first in first out, one flight per credential, and refuses a new call at once meanwhile", async () => {
    const f = scripted(2);
    const a = f.answer("a");
    const b = f.answer("b");
    const c1 = f.answer("c", {});
    const d = f.answer("d", {});
    const c2 = f.answer("c", {});
    expect(f.asked).toEqual(["a", "b"]);
    expect(f.flights.waiting).toBe(3);
    // A new call is not queued: refused at once, as before.
    await expect(f.answer("e")).rejects.toThrow("refused: busy");
    f.settle("a");
    await a;
    await tick();
    // a's slot went to c, the oldest waiting credential, asked once for both of its waiters.
    expect(f.asked).toEqual(["a", "b", "c"]);
    f.settle("c");
    expect(await c1).toBe("answer c");
    expect(await c2).toBe("answer c");
    await tick();
    expect(f.asked).toEqual(["a", "b", "c", "d"]);
    f.settle("b");
    f.settle("d");
    expect(await Promise.all([b, d])).toEqual(["answer b", "answer d"]);
    expect(f.flights.waiting).toBe(0);
    expect(f.refusals).toEqual(["busy"]);
    expect(f.flights.refused).toBe(1);
  });

  it("refuses the waiters whose deadline passes, each counted once, without asking again", async () => {
    const f = scripted(1, 80);
    void f.answer("a");
    const started = performance.now();
    const waits = ["b", "c", "d"].map((c) => f.answer(c, {}).catch((e: Error) => e.message));
    expect(await Promise.all(waits)).toEqual(Array(3).fill("refused: waited"));
    expect(performance.now() - started).toBeGreaterThanOrEqual(75);
    expect(f.refusals).toEqual(["waited", "waited", "waited"]);
    expect(f.flights.refused).toBe(3);
    expect(f.flights.waiting).toBe(0);
    // Nothing was asked but the flight that held the slot.
    f.settle("a");
    await tick();
    expect(f.asked).toEqual(["a"]);
  });

  it("lets a waiter leave when its signal aborts: a credential nobody waits for any more is not asked", async () => {
    const f = scripted(1);
    void f.answer("a");
    const gone = new AbortController();
    const left = f.answer("b", { signal: gone.signal }).catch((e: unknown) => e);
    const stays = f.answer("c", {});
    expect(f.flights.waiting).toBe(2);
    gone.abort("left");
    expect(await left).toBe("left");
    expect(f.flights.waiting).toBe(1);
    f.settle("a");
    await tick();
    expect(f.asked).toEqual(["a", "c"]);
    f.settle("c");
    expect(await stays).toBe("answer c");
    expect(f.refusals).toEqual([]);
  });

  it("keeps a quarter of the slots for calls that may not wait: a freed slot goes to the queue only while waiting calls fly in fewer than 3/4", async () => {
    const f = scripted(4);
    expect(f.flights.recheckShare).toBe(3);
    const waits = ["w1", "w2", "w3", "w4", "w5"].map((c) => f.answer(c, {}));
    // Three fly (their share), two wait although a slot is free.
    expect(f.asked).toEqual(["w1", "w2", "w3"]);
    expect(f.flights.waiting).toBe(2);
    // A new call (or an urgent re-check) takes the fourth at once; one more is refused.
    const n1 = f.answer("n1");
    expect(f.asked).toEqual(["w1", "w2", "w3", "n1"]);
    await expect(f.answer("n2")).rejects.toThrow("refused: busy");
    // Its slot is not handed to the queue (the waiting calls hold their share): the next new call takes it.
    f.settle("n1");
    await n1;
    await tick();
    expect(f.flights.waiting).toBe(2);
    void f.answer("n3");
    expect(f.asked).toEqual(["w1", "w2", "w3", "n1", "n3"]);
    // A waiting call's flight ending hands its slot on, first in first out.
    f.settle("w1");
    await tick();
    expect(f.asked).toEqual(["w1", "w2", "w3", "n1", "n3", "w4"]);
    // A call that may wait arriving meanwhile queues behind the others, first in first out.
    for (const c of ["w2", "w3", "w4"]) f.settle(c);
    const w6 = f.answer("w6", {});
    await tick();
    expect(f.asked.slice(6)).toEqual(["w5", "w6"]);
    for (const c of ["w5", "w6", "n3"]) f.settle(c);
    expect(await Promise.all([...waits, w6])).toHaveLength(6);
    expect(f.refusals).toEqual(["busy"]);
  });

  it("answers the waiters of a credential a new call asks for meanwhile, in the slot kept free, and asks it once", async () => {
    const f = scripted(4);
    for (const c of ["w1", "w2", "w3"]) void f.answer(c, {});
    const waiting = [f.answer("x", {}), f.answer("x", {})];
    expect(f.flights.waiting).toBe(2);
    const fresh = f.answer("x");
    expect(f.flights.waiting).toBe(0);
    f.settle("x");
    expect(await Promise.all([fresh, ...waiting])).toEqual(Array(3).fill("answer x"));
    for (const c of ["w1", "w2", "w3"]) f.settle(c);
    await tick();
    expect(f.asked).toEqual(["w1", "w2", "w3", "x"]);
  });

  it("serves the calls waiting first (the periodic re-checks) ahead of the others, first in first out, within the same share", async () => {
    const f = scripted(4);
    for (const c of ["w1", "w2", "w3"]) void f.answer(c, {});
    const queued = ["q1", "q2"].map((c) => f.answer(c, {}));
    const first = ["p1", "p2"].map((c) => f.answer(c, { first: true }));
    // The share is taken: they wait too, although the fourth slot is free (it stays the new calls').
    expect(f.asked).toEqual(["w1", "w2", "w3"]);
    expect(f.flights.waiting).toBe(4);
    for (const c of ["w1", "w2", "w3", "p1", "p2"]) {
      f.settle(c);
      await tick();
    }
    expect(f.asked).toEqual(["w1", "w2", "w3", "p1", "p2", "q1", "q2"]);
    for (const c of ["q1", "q2"]) f.settle(c);
    expect(await Promise.all([...first, ...queued])).toEqual([
      "answer p1",
      "answer p2",
      "answer q1",
      "answer q2",
    ]);
    expect(f.refusals).toEqual([]);
  });

  it("puts a credential at Tessera once at a time: calls at later epochs join one follow-up, asked in the slot its call frees, never refused", async () => {
    const f = scripted(2);
    const first = [f.answer("a"), f.answer("b")];
    // Revocation events of any tenant move the epoch: the new calls for a and b wait for
    // their credential's call at Tessera, and take no slot of their own.
    const later: Promise<string>[] = [];
    for (let epoch = 1; epoch <= 5; epoch++)
      for (const c of ["a", "b"]) later.push(f.answer(c, undefined, epoch));
    expect(f.asked).toEqual(["a", "b"]);
    expect(f.refusals).toEqual([]);
    // Both slots are held: a new credential is refused at once, as before.
    await expect(f.answer("c", undefined, 5)).rejects.toThrow("refused: busy");
    // Once Tessera answers a, a's five later calls are asked once, in a's slot.
    f.settle("a");
    expect(await first[0]).toBe("answer a");
    expect(f.asked).toEqual(["a", "b", "a"]);
    // A call at the follow-up's epoch joins it; a later one waits for the next.
    const five = f.answer("a", undefined, 5);
    const six = f.answer("a", undefined, 6);
    expect(f.asked).toEqual(["a", "b", "a"]);
    f.settle("a");
    await tick();
    expect(f.asked).toEqual(["a", "b", "a", "a"]);
    f.settle("a");
    f.settle("b");
    await tick();
    f.settle("b");
    expect(await Promise.all([...later, five, six, first[1]])).toEqual([
      ...Array(5).fill(["answer a", "answer b"]).flat(),
      "answer a",
      "answer a",
      "answer b",
    ]);
    expect(f.asked).toEqual(["a", "b", "a", "a", "b"]);
    expect(f.tessera.peak).toBe(2);
    expect(f.refusals).toEqual(["busy"]);
  });

  it("makes a re-check at a later epoch join its credential's follow-up, not the queue; the queue gets the slots the others free", async () => {
    const f = scripted(4);
    for (const c of ["a", "b", "c"]) void f.answer(c, undefined, 0);
    void f.answer("d", {}, 0);
    // A loss (epoch 1): held streams of c, a and b re-checked. Their credentials are at
    // Tessera: each re-check waits for that call, in no queue; x waits for a slot.
    const rechecks = ["c", "a", "b"].map((c) => f.answer(c, {}, 1));
    const x = f.answer("x", {}, 1);
    expect(f.asked).toEqual(["a", "b", "c", "d"]);
    expect(f.flights.waiting).toBe(1);
    await expect(f.answer("e", undefined, 1)).rejects.toThrow("refused: busy");
    // d's slot goes to the queue; a's, b's and c's to their follow-ups.
    for (const [answered, next] of [
      ["d", "x"],
      ["a", "a"],
      ["c", "c"],
      ["b", "b"],
    ]) {
      f.settle(answered!);
      await tick();
      expect(f.asked.at(-1)).toBe(next);
    }
    expect(f.asked).toEqual(["a", "b", "c", "d", "x", "a", "c", "b"]);
    for (const c of ["x", "a", "c", "b"]) f.settle(c);
    expect(await Promise.all([...rechecks, x])).toEqual(["answer c", "answer a", "answer b", "answer x"]);
    expect(f.tessera.peak).toBe(4);
    expect(f.refusals).toEqual(["busy"]);
  });

  it("lets a follow-up's caller leave when its signal aborts (not asked for nobody), and rejects those left when the flights close", async () => {
    const f = scripted(1);
    const a = f.answer("a");
    const gone = new AbortController();
    const left = f.answer("a", { signal: gone.signal }, 1);
    gone.abort(new Error("stream ended"));
    await expect(left).rejects.toThrow("stream ended");
    f.settle("a");
    expect(await a).toBe("answer a");
    await tick();
    expect(f.asked).toEqual(["a"]);
    // The slot is free again: a's next call flies; one after it, and a queued one, end on close.
    const again = f.answer("a", undefined, 1);
    const follow = f.answer("a", undefined, 2);
    const queued = f.answer("q", {}, 2);
    f.flights.close(new Error("closing"));
    await expect(follow).rejects.toThrow("closing");
    await expect(queued).rejects.toThrow("closing");
    expect(f.flights.waiting).toBe(0);
    f.settle("a");
    expect(await again).toBe("answer a");
    await tick();
    expect(f.asked).toEqual(["a", "a"]);
    void f.answer("b");
    expect(f.asked).toEqual(["a", "a", "b"]);
  });

  it("gives calls that may wait 3/4 of the slots, at least one", () => {
    expect([1, 2, 3, 4, 64, 1024].map((max) => new VerifyFlights(max).recheckShare)).toEqual([
      1, 1, 2, 3, 48, 768,
    ]);
  });
});

/** Tessera answering VerifyCredential only while the test opens its gate, counting the calls it holds at once (per credential too). */
function gatedTessera() {
  const watch = new FakeStream();
  const at = { asked: 0, now: 0, peak: 0, peakPerCredential: 0 };
  const perCredential = new Map<string, number>();
  let open!: () => void;
  let gate!: Promise<void>;
  /** Hold every call Tessera gets from now until {@link open}. */
  const close = () => {
    gate = new Promise<void>((resolve) => {
      open = resolve;
    });
  };
  close();
  const transport = createRouterTransport(({ service }) =>
    service(VerificationService, {
      async verifyCredential(req) {
        at.asked++;
        at.peak = Math.max(at.peak, ++at.now);
        const mine = (perCredential.get(req.credential) ?? 0) + 1;
        perCredential.set(req.credential, mine);
        at.peakPerCredential = Math.max(at.peakPerCredential, mine);
        await gate;
        at.now--;
        perCredential.set(req.credential, perCredential.get(req.credential)! - 1);
        return {
          valid: true,
          code: VerificationCode.VALID,
          principalId: `user-${req.credential}`,
          principalKind: VerifiedPrincipalKind.USER,
          tenantId: "tenant-1",
          scopes: ["r"],
          credentialId: `cid-${req.credential}`,
          credentialKind: "pat",
        };
      },
      async *watchRevocations(_req, ctx) {
        yield* watch.messages(ctx.signal);
      },
    }),
  );
  return { watch, at, open: () => open(), close, transport };
}

describe("the core's VerifyCredential calls at Tessera", () => {
  it("never outnumber maxConcurrentVerifications while revocation events of other tenants move the watch's epoch", async () => {
    const tessera = gatedTessera();
    const auth = createTesseraAuth({
      server: "https://tessera.invalid",
      transport: tessera.transport,
      maxConcurrentVerifications: 2,
      jwt: { verify: "online" },
      fetchJson: async () => ({ keys: [] }),
    });
    try {
      tessera.watch.push({ cursor: "c0", heartbeatSeconds: 30 });
      expect(await auth.ready(5000)).toBe(true);
      const first = ["a", "b"].map((c) => auth.authenticate(`Bearer pat-${c}`));
      await expect.poll(() => tessera.at.now).toBe(2);
      // Five events of another tenant, each followed by a new call for each credential in flight.
      const again: Promise<unknown>[] = [];
      for (let i = 1; i <= 5; i++) {
        const events = auth.stats().watch!.events;
        tessera.watch.push({
          cursor: `c${i}`,
          events: [{ kind: RevocationKind.SUBJECT, id: `elsewhere-${i}`, tenantId: "tenant-2" } as never],
        });
        await expect.poll(() => auth.stats().watch!.events).toBe(events + 1);
        for (const c of ["a", "b"]) again.push(auth.authenticate(`Bearer pat-${c}`).catch((e: unknown) => e));
      }
      // None of the ten was refused, nor asked yet: each waits for its credential's call at Tessera.
      expect(auth.stats().verifyRefused).toBe(0);
      expect(auth.stats().verifyCalls).toBe(2);
      expect(tessera.at.asked).toBe(2);
      expect(tessera.at.peak).toBe(2);
      tessera.open();
      expect((await Promise.all(first)).map((p) => p.id)).toEqual(["user-pat-a", "user-pat-b"]);
      // Then each credential is asked once more for the five later calls, in the slot its call freed.
      const later = (await Promise.all(again)) as { id: string }[];
      expect(later.map((p) => p.id)).toEqual(Array(5).fill(["user-pat-a", "user-pat-b"]).flat());
      expect(auth.stats().verifyCalls).toBe(4);
      expect(tessera.at.asked).toBe(4);
      expect(tessera.at.peak).toBe(2);
    } finally {
      auth.close();
    }
  });

  it("take one slot per credential under a storm of other tenants' events: nobody refused, a held stream's urgent re-check waits for its credential's call", async () => {
    const tessera = gatedTessera();
    const auth = createTesseraAuth({
      server: "https://tessera.invalid",
      transport: tessera.transport,
      maxConcurrentVerifications: 4,
      jwt: { verify: "online" },
      fetchJson: async () => ({ keys: [] }),
    });
    let events = 0;
    const storm = async (target: RevocationKind, id: string, tenantId: string) => {
      const seen = auth.stats().watch!.events;
      tessera.watch.push({ cursor: `c${++events}`, events: [{ kind: target, id, tenantId } as never] });
      await expect.poll(() => auth.stats().watch!.events).toBe(seen + 1);
    };
    try {
      tessera.watch.push({ cursor: "c0", heartbeatSeconds: 30 });
      expect(await auth.ready(5000)).toBe(true);
      // A stream held with a hot credential, its admission answered after an event (not cached).
      const holding = auth.holdStream("Bearer pat-hot-1", undefined, { scopes: ["r"] });
      await expect.poll(() => tessera.at.now).toBe(1);
      await storm(RevocationKind.SESSION, "elsewhere-0", "tenant-2");
      tessera.open();
      const hot = await holding;
      const calls: Promise<unknown>[] = [];
      const refused = (e: unknown) => (e as TesseraAuthError).reason;
      // Tessera slow (no answer yet) while each of six events of another tenant moves the epoch
      // and both hot credentials are called again: old calls never land in the cache.
      tessera.close();
      for (let i = 1; i <= 6; i++) {
        await storm(RevocationKind.SESSION, `elsewhere-${i}`, "tenant-2");
        for (const c of ["hot-1", "hot-2"]) calls.push(auth.authenticate(`Bearer pat-${c}`).catch(refused));
      }
      // Another client's credential still finds a slot.
      calls.push(auth.authenticate("Bearer pat-other").catch(refused));
      // An event naming the held stream's subject: its re-check is urgent, never refused for a slot.
      await storm(RevocationKind.SUBJECT, "user-pat-hot-1", "tenant-1");
      expect(auth.stats().verifyRefused).toBe(0);
      expect(hot.signal.aborted).toBe(false);
      expect(tessera.at.now).toBe(3);
      tessera.open();
      const answered = (await Promise.all(calls)) as { id: string }[];
      expect(answered.map((p) => p.id)).toEqual([
        ...Array(6).fill(["user-pat-hot-1", "user-pat-hot-2"]).flat(),
        "user-pat-other",
      ]);
      // The hold's admission, then per hot credential its first call and one follow-up, and other's.
      await expect.poll(() => auth.stats().verifyCalls).toBe(6);
      await expect.poll(() => tessera.at.now).toBe(0);
      expect(hot.signal.aborted).toBe(false);
      expect(auth.stats().verifyRefused).toBe(0);
      expect(tessera.at.peak).toBe(3);
      expect(tessera.at.peakPerCredential).toBe(1);
      hot.release();
    } finally {
      auth.close();
    }
  });
});
