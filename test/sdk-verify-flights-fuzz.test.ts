import { expect, it } from "vitest";
import { VerifyFlights } from "../src/sdk/server/verify-flights.js";

/**
 * VerifyFlights under random calls, epochs, answers, failures and aborts: never more than
 * `max` calls at Tessera, nor more than the share for calls that may wait, nor a credential
 * twice; no caller answered by a call asked before its epoch; every call settles once Tessera
 * answers everything; and no slot leaks (`max` fresh calls all fly afterwards).
 */

/** A seeded generator, so that a failing seed can be replayed. */
function random(seed: number) {
  let state = seed;
  return () => {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    return state / 2 ** 31;
  };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

interface Asked {
  readonly credential: string;
  /** Counted against the share: a follow-up keeps the kind of the slot it is handed. */
  readonly waitable: boolean;
  resolve(): void;
  reject(err: Error): void;
}

async function run(seed: number): Promise<string[]> {
  const r = random(seed);
  const max = 1 + Math.floor(r() * 5);
  const flights = new VerifyFlights<number>(max, (why) => new Error(why), 60_000);
  const violations: string[] = [];
  let epoch = 0;
  const out: Asked[] = [];
  /** Credentials whose call just settled, with its kind: the next ask for one is its follow-up. */
  const handed = new Map<string, boolean>();
  const calls: { done: boolean }[] = [];
  const controllers: AbortController[] = [];
  const check = () => {
    if (out.length > max) violations.push(`seed ${seed}: ${out.length} at Tessera > max ${max}`);
    const waitable = out.filter((a) => a.waitable).length;
    if (waitable > flights.recheckShare)
      violations.push(`seed ${seed}: ${waitable} waitable > share ${flights.recheckShare}`);
    if (new Set(out.map((a) => a.credential)).size < out.length)
      violations.push(`seed ${seed}: a credential twice at Tessera`);
  };
  const answer = async (a: Asked) => {
    out.splice(out.indexOf(a), 1);
    handed.set(a.credential, a.waitable);
    if (r() < 0.8) a.resolve();
    else a.reject(new Error("transport"));
    await tick();
    handed.clear();
    check();
  };
  const call = (credential: string, waitable: boolean, first: boolean) => {
    const controller = new AbortController();
    controllers.push(controller);
    const at = epoch;
    const record = { done: false };
    calls.push(record);
    const ask = () => {
      const askedAt = epoch;
      const kind = handed.get(credential) ?? waitable;
      handed.delete(credential);
      return new Promise<number>((resolve, reject) => {
        out.push({ credential, waitable: kind, resolve: () => resolve(askedAt), reject });
        check();
      });
    };
    flights.answer(credential, at, ask, waitable ? { signal: controller.signal, first } : undefined).then(
      (askedAt) => {
        record.done = true;
        if (askedAt < at)
          violations.push(`seed ${seed}: a call at epoch ${at} answered as asked at ${askedAt}`);
      },
      () => {
        record.done = true;
      },
    );
  };
  for (let step = 0; step < 60; step++) {
    const x = r();
    if (x < 0.45) {
      const waitable = r() < 0.5;
      call(`c${Math.floor(r() * 4)}`, waitable, waitable && r() < 0.3);
    } else if (x < 0.75 && out.length > 0) await answer(out[Math.floor(r() * out.length)]!);
    else if (x < 0.85) epoch++;
    else if (x < 0.9 && controllers.length > 0)
      controllers[Math.floor(r() * controllers.length)]!.abort(new Error("left"));
    else await tick();
  }
  // Tessera answers everything, follow-ups and what the queue sends included.
  for (let round = 0; round < 200 && (out.length > 0 || flights.waiting > 0); round++)
    while (out.length > 0) await answer(out[0]!);
  await tick();
  const hanging = calls.filter((c) => !c.done).length;
  if (hanging > 0) violations.push(`seed ${seed}: ${hanging} calls never settled`);
  let flew = 0;
  for (let i = 0; i < max; i++)
    flights
      .answer(`fresh${i}`, epoch, () => {
        flew++;
        return new Promise<number>(() => {});
      })
      .catch(() => {});
  if (flew !== max) violations.push(`seed ${seed}: ${flew} of ${max} fresh calls flew (a slot leaked)`);
  return violations;
}

it("keeps the cap, the share, one call per credential and the epochs under random calls, answers and aborts", async () => {
  const violations: string[] = [];
  for (let seed = 1; seed <= 300; seed++) violations.push(...(await run(seed)));
  expect(violations.slice(0, 10)).toEqual([]);
});
