import { describe, expect, it } from "vitest";
import { type FlightRefusal, VerifyFlights } from "../src/sdk/server/verify-flights.js";

/**
 * The core's verifications in flight on their own: at most `max` distinct credentials asked
 * at once, a call past it refused at once, except a call that may wait (a held stream's
 * re-check), which waits first in first out for a flight to end, up to a deadline.
 */

function deferred<T>() {
  let resolve!: (v: T) => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Flights whose answers the test gives, recording what was asked. */
function scripted(max: number, waitMs = 60_000) {
  const asked: string[] = [];
  const answers = new Map<string, ReturnType<typeof deferred<string>>>();
  const refusals: FlightRefusal[] = [];
  /** Credentials whose ask throws at once. */
  const throwing = new Set<string>();
  const flights = new VerifyFlights<string>(
    max,
    (why) => {
      refusals.push(why);
      return new Error(`refused: ${why}`);
    },
    waitMs,
  );
  const answer = (
    credential: string,
    wait?: { signal?: AbortSignal; first?: boolean },
    epoch = 0,
    exact = false,
  ) =>
    flights.answer(
      credential,
      epoch,
      () => {
        asked.push(credential);
        if (throwing.has(credential)) throw new Error(`thrown ${credential}`);
        const d = deferred<string>();
        answers.set(credential, d);
        return d.promise;
      },
      wait,
      exact,
    );
  /** Answer the credential's latest ask. */
  const settle = (credential: string, value = `answer ${credential}`) =>
    answers.get(credential)!.resolve(value);
  const fail = (credential: string) => answers.get(credential)!.reject(new Error(`failed ${credential}`));
  return { flights, asked, refusals, answer, settle, fail, throwing };
}

const tick = () => new Promise((r) => setTimeout(r, 0));

/** The promise's value if it settled by the next tick, else "pending" (a hung call fails, not hangs). */
const now = <T>(p: Promise<T>) => Promise.race([p, tick().then(() => "pending")]);

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

  it("holds a call that may wait to its share when it would replace a new call's flight of an older epoch", async () => {
    const f = scripted(4);
    for (const c of ["a", "b", "c"]) void f.answer(c, undefined, 0);
    void f.answer("d", {}, 0);
    // A loss (epoch 1): held streams of a, b and c re-checked. Two fit in the share, replacing
    // the new calls' flights; the third would hold a fourth slot of re-checks: it waits.
    const c1 = f.answer("c", {}, 1);
    void f.answer("a", {}, 1);
    const b1 = f.answer("b", {}, 1);
    expect(f.asked).toEqual(["a", "b", "c", "d", "c", "a"]);
    expect(f.flights.waiting).toBe(1);
    // When a re-check's flight ends, b's flies in its slot.
    f.settle("d");
    await tick();
    expect(f.asked).toEqual(["a", "b", "c", "d", "c", "a", "b"]);
    f.settle("b");
    f.settle("c");
    expect(await Promise.all([c1, b1])).toEqual(["answer c", "answer b"]);
    expect(f.refusals).toEqual([]);
  });

  it("gives calls that may wait 3/4 of the slots, at least one", () => {
    expect([1, 2, 3, 4, 64, 1024].map((max) => new VerifyFlights(max).recheckShare)).toEqual([
      1, 1, 2, 3, 48, 768,
    ]);
  });

  describe("of an exact credential (its answer may change with no event)", () => {
    it("asks it one flight at a time: the calls during one join the next, asked in its slot when it ends, never refused for a slot", async () => {
      const f = scripted(2);
      const first = f.answer("x", undefined, 0, true);
      void f.answer("y");
      // Whatever their epoch, and whether they may wait or not.
      const during = [
        f.answer("x", undefined, 0, true),
        f.answer("x", {}, 0, true),
        f.answer("x", undefined, 5, true),
      ];
      expect(f.asked).toEqual(["x", "y"]);
      expect(f.flights.waiting).toBe(0);
      await expect(f.answer("z")).rejects.toThrow("refused: busy");
      f.settle("x", "first");
      expect(await first).toBe("first");
      expect(f.asked).toEqual(["x", "y", "x"]);
      // The follow-up took the slot: no other credential got it meanwhile.
      await expect(f.answer("z")).rejects.toThrow("refused: busy");
      const later = f.answer("x", undefined, 0, true);
      f.settle("x", "second");
      expect(await Promise.all(during)).toEqual(["second", "second", "second"]);
      expect(f.asked).toEqual(["x", "y", "x", "x"]);
      f.settle("x", "third");
      expect(await later).toBe("third");
      await tick();
      void f.answer("z");
      expect(f.asked).toEqual(["x", "y", "x", "x", "z"]);
      expect(f.refusals).toEqual(["busy", "busy"]);
    });

    it("lets a joiner leave when its signal aborts: a follow-up nobody joins any more is not asked, and the slot is freed", async () => {
      const f = scripted(1);
      const first = f.answer("x", undefined, 0, true);
      const gone = new AbortController();
      const left = f.answer("x", { signal: gone.signal }, 0, true).catch((e: unknown) => e);
      const aborted = new AbortController();
      aborted.abort("gone before");
      const late = f.answer("x", { signal: aborted.signal }, 0, true).catch((e: unknown) => e);
      gone.abort("left");
      expect(await left).toBe("left");
      expect(await late).toBe("gone before");
      f.settle("x");
      expect(await first).toBe("answer x");
      await tick();
      expect(f.asked).toEqual(["x"]);
      void f.answer("y");
      expect(f.asked).toEqual(["x", "y"]);
      expect(f.refusals).toEqual([]);
    });

    it("keeps one joiner's leaving from taking the others out: the follow-up is asked for those that stay", async () => {
      const f = scripted(1);
      void f.answer("x", undefined, 0, true);
      const gone = new AbortController();
      const left = f.answer("x", { signal: gone.signal }, 0, true).catch((e: unknown) => e);
      const stays = f.answer("x", {}, 0, true);
      gone.abort("left");
      expect(await left).toBe("left");
      f.settle("x", "first");
      await tick();
      expect(f.asked).toEqual(["x", "x"]);
      f.settle("x", "second");
      expect(await stays).toBe("second");
    });

    it("serves a re-check waiting in the queue before the follow-up: then its joiners that may wait queue for the next slot, the others are refused at once", async () => {
      const f = scripted(1);
      void f.answer("x", undefined, 0, true);
      const refused = f.answer("x", undefined, 0, true).catch((e: Error) => e.message);
      const waits = f.answer("x", {}, 0, true);
      const recheck = f.answer("r", {});
      expect(f.flights.waiting).toBe(1);
      f.settle("x", "first");
      await tick();
      // The slot went to the re-check, not to x's follow-up.
      expect(f.asked).toEqual(["x", "r"]);
      expect(await now(refused)).toBe("refused: busy");
      expect(f.flights.waiting).toBe(1);
      f.settle("r");
      expect(await recheck).toBe("answer r");
      await tick();
      // Asked after its joiners began, in the slot the re-check freed.
      expect(f.asked).toEqual(["x", "r", "x"]);
      f.settle("x", "second");
      expect(await now(waits)).toBe("second");
      expect(f.refusals).toEqual(["busy"]);
      expect(f.flights.waiting).toBe(0);
    });

    it("counts a follow-up in the re-checks' share only when one of its joiners may wait, whoever began the chain", async () => {
      // A chain begun by a re-check, followed up for a call that may not wait: out of the share.
      const begunWaiting = scripted(4);
      void begunWaiting.answer("a", {});
      void begunWaiting.answer("b", {});
      void begunWaiting.answer("x", {}, 0, true);
      void begunWaiting.answer("x", undefined, 0, true);
      expect(begunWaiting.flights.recheckShare).toBe(3);
      begunWaiting.settle("x");
      await tick();
      expect(begunWaiting.asked).toEqual(["a", "b", "x", "x"]);
      void begunWaiting.answer("c", {});
      expect(begunWaiting.asked).toEqual(["a", "b", "x", "x", "c"]);
      expect(begunWaiting.flights.waiting).toBe(0);

      // A chain begun by a call that may not wait, followed up for a re-check: in the share.
      const begunNot = scripted(4);
      void begunNot.answer("a", {});
      void begunNot.answer("b", {});
      void begunNot.answer("x", undefined, 0, true);
      void begunNot.answer("x", {}, 0, true);
      begunNot.settle("x");
      await tick();
      expect(begunNot.asked).toEqual(["a", "b", "x", "x"]);
      void begunNot.answer("c", {});
      expect(begunNot.asked).toEqual(["a", "b", "x", "x"]);
      expect(begunNot.flights.waiting).toBe(1);
      // The last slot stays free for a call that may not wait.
      void begunNot.answer("y");
      expect(begunNot.asked).toEqual(["a", "b", "x", "x", "y"]);

      // The share full, a follow-up for a re-check alone waits for it rather than take the last
      // slot, which stays free for a call that may not wait.
      const shareFull = scripted(4);
      for (const c of ["a", "b", "c"]) void shareFull.answer(c, {});
      void shareFull.answer("x", undefined, 0, true);
      void shareFull.answer("x", {}, 0, true);
      shareFull.settle("x");
      await tick();
      expect(shareFull.asked).toEqual(["a", "b", "c", "x"]);
      expect(shareFull.flights.waiting).toBe(1);
      void shareFull.answer("y");
      expect(shareFull.asked).toEqual(["a", "b", "c", "x", "y"]);
    });

    it("keeps busy exact tokens filling every slot from starving a waiting re-check: it is served as the first of them answers", async () => {
      const f = scripted(4, 1000);
      const busy = ["m0", "m1", "m2", "m3"];
      for (const m of busy) void f.answer(m, undefined, 0, true).catch(() => {});
      let served = false;
      const recheck = f.answer("r", {}).then((v) => {
        served = true;
        return v;
      });
      const refused: Promise<string>[] = [];
      // Each token gets a new call during every flight of it, round after round.
      for (let round = 0; round < 3 && !served; round++)
        for (const m of busy) {
          refused.push(f.answer(m, undefined, 0, true).catch((e: Error) => e.message));
          f.settle(m);
          await tick();
          if (f.asked.includes("r")) f.settle("r");
          await tick();
        }
      expect(served).toBe(true);
      expect(await recheck).toBe("answer r");
      expect(f.asked.slice(0, 5)).toEqual(["m0", "m1", "m2", "m3", "r"]);
      // m0's follow-up found no slot free for its call: refused at once, as a new one.
      expect(await now(refused[0])).toBe("refused: busy");
      expect(f.refusals).not.toContain("waited");
    });

    it("frees the slot whatever the answer: a failed ask is followed up, and a follow-up thrown at once refuses its joiners", async () => {
      const f = scripted(1);
      const first = f.answer("x", undefined, 0, true).catch((e: Error) => e.message);
      const second = f.answer("x", undefined, 0, true);
      f.fail("x");
      expect(await first).toBe("failed x");
      expect(f.asked).toEqual(["x", "x"]);
      const third = f.answer("x", undefined, 0, true).catch((e: Error) => e.message);
      f.throwing.add("x");
      f.settle("x", "second");
      expect(await second).toBe("second");
      expect(await third).toBe("thrown x");
      await tick();
      void f.answer("y");
      expect(f.asked).toEqual(["x", "x", "x", "y"]);
      expect(f.refusals).toEqual([]);
    });
  });
});
