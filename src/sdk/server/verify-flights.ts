import { performance } from "node:perf_hooks";

/** A verification whose credential is not in flight yet, waiting for a slot (see {@link VerifyFlights}). */
interface Queued<T> {
  readonly credential: string;
  /** The latest epoch a waiter asked at: its flight, asked after every one of them began, carries it. */
  epoch: number;
  readonly ask: () => Promise<T>;
  /** performance.now() past which its waiters are refused. */
  readonly deadline: number;
  readonly waiters: Set<Waiter<T>>;
  /** Waiting at the head of the queue (see {@link VerifyFlights.answer}'s `wait.first`). */
  readonly first: boolean;
}

interface Waiter<T> {
  resolve(answer: Promise<T>): void;
  reject(err: unknown): void;
  /** Stop listening to the waiter's signal (it is served, refused or gone). */
  off(): void;
}

interface Flight<T> {
  readonly epoch: number;
  readonly answer: Promise<T>;
  /** Asked for a call that may wait: counted against {@link VerifyFlights.recheckShare}. */
  readonly waitable: boolean;
  /** Calls at a later epoch, asked once this flight settles, in its slot. */
  next: FollowUp<T> | undefined;
}

/** A credential's next ask, for calls at an epoch later than its flight's (see {@link VerifyFlights}). */
interface FollowUp<T> {
  /** The latest epoch a joiner asked at: asked after every one of them began, it carries it. */
  epoch: number;
  readonly ask: () => Promise<T>;
  readonly waiters: Set<Waiter<T>>;
}

/** How a call may wait for a slot: until `signal` aborts; `first`, ahead of those that do not. */
export interface SlotWait {
  readonly signal?: AbortSignal;
  readonly first?: boolean;
}

/** Why a call was refused: no slot free at once, or none within the wait's deadline. */
export type FlightRefusal = "busy" | "waited";

/**
 * VerifyCredential calls in flight, by credential, each with the revocation watch's epoch
 * when it was asked: concurrent calls for one credential share one answer. A call asked
 * before an event (or a loss of the stream) may carry an answer the event revokes, so it
 * is joined only by calls at its epoch or earlier; a later call asks again.
 *
 * At most `max` calls are at Tessera at once: the service's callers choose the credentials,
 * and each one not yet known was one more call to Tessera held in memory (queued behind the
 * connection's stream limit) for as long as the caller kept sending new ones. A slot is held
 * by each call until Tessera answers it (or its timeout ends it). A credential is at Tessera
 * once at a time: the epoch moves with every event of any tenant, so a re-ask in a slot of
 * its own let an event storm put a hot credential in many slots, refusing everyone else.
 * A call at a later epoch joins the credential's follow-up instead, asked (at the latest
 * epoch of its joiners) once the call at Tessera settles, in the slot that call held and of
 * its kind (so the share below holds): never refused, it waits for at most that call's
 * timeout, and leaves when its signal aborts. Past `max` a new credential is refused with
 * `refusal("busy")` at once, and counted.
 *
 * Except a call that may wait (a held stream's re-check: see StreamHolds): it waits, first
 * in first out, for a slot, and is refused with `refusal("waited")` (counted once) only when
 * `waitMs` pass first. Such calls fly in at most {@link recheckShare} of the slots (3/4 of
 * `max`, at least 1): a loss re-checks every held stream at once, and without it the queue
 * took every slot as it freed, refusing each new call (and each urgent re-check) for as long
 * as it lasted. The rest stay free for calls that may not wait. A call ending without a
 * follow-up hands its slot to the oldest waiting credential while those fly in fewer than their share, before
 * anything else runs; calls asked to wait `first` (the periodic re-check while the watch is
 * down) are served before all the others, first in first out among themselves. Waiters for
 * one credential wait as one entry and share its flight; one timer, for the oldest entry's
 * deadline, serves both queues (deadlines are in arrival order in each). A waiter leaves
 * when its signal aborts.
 */
export class VerifyFlights<T> {
  /** The flight of each credential at Tessera: calls at its epoch or earlier join it. */
  readonly #flights = new Map<string, Flight<T>>();
  /** Calls at Tessera now (counted against `max`). */
  #asking = 0;
  /** Of those, the ones asked for calls that may wait (counted against {@link recheckShare}). */
  #waitable = 0;
  /** Slots calls that may wait fly in at most: 3/4 of `max`, at least 1. */
  readonly recheckShare: number;
  /** Waiting credentials, oldest first (a Map keeps insertion order and deletes in O(1)). */
  readonly #queue = new Map<string, Queued<T>>();
  /** Those waiting `first`, served before {@link #queue} (a credential may wait in both). */
  readonly #head = new Map<string, Queued<T>>();
  #timer: NodeJS.Timeout | undefined;
  #waiting = 0;
  /** Calls refused: `max` verifications were at Tessera already (at once, or past the wait). */
  refused = 0;

  constructor(
    private readonly max = Number.POSITIVE_INFINITY,
    private readonly refusal: (why: FlightRefusal) => Error = () =>
      new Error("too many verifications in flight"),
    private readonly waitMs = 5000,
  ) {
    this.recheckShare = Math.max(1, Math.floor((max * 3) / 4));
  }

  /** Calls waiting for a slot now. */
  get waiting(): number {
    return this.#waiting;
  }

  /**
   * The answer for `credential`: its flight at Tessera if asked at `epoch` or later, else its
   * follow-up's (asked once that flight settles), else `ask()`'s. With `wait`,
   * the call waits for a slot when none is free (until `waitMs`, or `wait.signal` aborts:
   * then it is rejected with the signal's reason); `wait.first`: ahead of those that do not.
   */
  answer(credential: string, epoch: number, ask: () => Promise<T>, wait?: SlotWait): Promise<T> {
    const pending = this.#flights.get(credential);
    if (pending !== undefined)
      return epoch <= pending.epoch ? pending.answer : this.#follow(pending, epoch, ask, wait?.signal);
    if (wait !== undefined) {
      const first = wait.first === true;
      const ahead = this.#head.size > 0 || (!first && this.#queue.size > 0);
      if (ahead || !this.#free(true)) return this.#enqueue(credential, epoch, ask, first, wait.signal);
    } else if (!this.#free(false)) {
      this.refused++;
      return Promise.reject(this.refusal("busy"));
    }
    return this.#fly(credential, epoch, ask, wait !== undefined);
  }

  /** Whether a slot is free for a call (`waitable`: one that may wait, within its share). */
  #free(waitable: boolean): boolean {
    return this.#asking < this.max && (!waitable || this.#waitable < this.recheckShare);
  }

  /** `handed`: in the slot of the credential's flight that just settled (already counted). */
  #fly(
    credential: string,
    epoch: number,
    ask: () => Promise<T>,
    waitable: boolean,
    handed = false,
  ): Promise<T> {
    const flight: Flight<T> = {
      epoch,
      waitable,
      next: undefined,
      answer: ask().finally(() => this.#landed(credential, flight)),
    };
    if (!handed) {
      this.#asking++;
      if (waitable) this.#waitable++;
    }
    this.#flights.set(credential, flight);
    // A new call for a waiting credential, in a slot kept free: asked after every waiter
    // began, it answers them too (a waiting credential has no flight: calls for one at Tessera
    // join it or its follow-up).
    for (const queue of [this.#head, this.#queue]) {
      const queued = queue.get(credential);
      if (queued === undefined) continue;
      queue.delete(credential);
      this.#settle(queued, (waiter) => waiter.resolve(flight.answer));
    }
    if (this.#empty()) this.#disarm();
    return flight.answer;
  }

  /** Tessera answered `flight` (or it failed): its slot goes to its follow-up, else is free. */
  #landed(credential: string, flight: Flight<T>): void {
    const next = flight.next;
    flight.next = undefined;
    if (this.#flights.get(credential) === flight) this.#flights.delete(credential);
    if (next !== undefined && next.waiters.size > 0) {
      // Of the settling flight's kind, so the counts (and the share) stay as they were.
      const answer = this.#fly(credential, next.epoch, next.ask, flight.waitable, true);
      for (const waiter of next.waiters) {
        waiter.off();
        waiter.resolve(answer);
      }
      return;
    }
    this.#asking--;
    if (flight.waitable) this.#waitable--;
    this.#pump();
  }

  /** Join `flight`'s follow-up at `epoch` (raising its epoch); leave it when `signal` aborts. */
  #follow(flight: Flight<T>, epoch: number, ask: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    const next = flight.next ?? { epoch, ask, waiters: new Set<Waiter<T>>() };
    flight.next = next;
    next.epoch = Math.max(next.epoch, epoch);
    return new Promise<T>((resolve, reject) => {
      const leave = () => {
        // Nobody left to answer: the slot frees when the flight settles, not asked again.
        if (next.waiters.delete(waiter)) reject(signal!.reason);
      };
      const waiter: Waiter<T> = { resolve, reject, off: () => signal?.removeEventListener("abort", leave) };
      next.waiters.add(waiter);
      signal?.addEventListener("abort", leave, { once: true });
    });
  }

  /**
   * Reject every call waiting (for a slot or a follow-up) with `reason`: the core closes, and
   * nothing vouches for what would be asked after. Flights at Tessera end on their own.
   */
  close(reason: Error): void {
    for (const flight of this.#flights.values()) {
      for (const waiter of flight.next?.waiters ?? []) {
        waiter.off();
        waiter.reject(reason);
      }
      flight.next = undefined;
    }
    for (const queue of [this.#head, this.#queue]) {
      for (const entry of queue.values()) this.#settle(entry, (waiter) => waiter.reject(reason));
      queue.clear();
    }
    this.#disarm();
  }

  #enqueue(
    credential: string,
    epoch: number,
    ask: () => Promise<T>,
    first: boolean,
    signal?: AbortSignal,
  ): Promise<T> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    const queue = first ? this.#head : this.#queue;
    let entry = queue.get(credential);
    if (entry === undefined) {
      entry = {
        credential,
        epoch,
        ask,
        deadline: performance.now() + this.waitMs,
        waiters: new Set(),
        first,
      };
      queue.set(credential, entry);
      this.#arm();
    } else entry.epoch = Math.max(entry.epoch, epoch);
    const queued = entry;
    return new Promise<T>((resolve, reject) => {
      const leave = () => {
        this.#leave(queued, waiter);
        reject(signal!.reason);
      };
      const waiter: Waiter<T> = { resolve, reject, off: () => signal?.removeEventListener("abort", leave) };
      queued.waiters.add(waiter);
      this.#waiting++;
      signal?.addEventListener("abort", leave, { once: true });
    });
  }

  #leave(entry: Queued<T>, waiter: Waiter<T>): void {
    if (!entry.waiters.delete(waiter)) return;
    this.#waiting--;
    // Nobody waits for it any more: it is not asked (the timer skips a gone head on its own).
    const queue = entry.first ? this.#head : this.#queue;
    if (entry.waiters.size === 0 && queue.get(entry.credential) === entry) queue.delete(entry.credential);
    if (this.#empty()) this.#disarm();
  }

  #empty(): boolean {
    return this.#head.size === 0 && this.#queue.size === 0;
  }

  /** Hand free slots, within the share, to the oldest waiting credentials (those waiting first, first). */
  #pump(): void {
    // None that may wait starts but here while any waits. A waiting credential is not at
    // Tessera; the same credential waiting in the other queue is answered by this flight too
    // (asked after it began waiting).
    for (const queue of [this.#head, this.#queue])
      for (const entry of queue.values()) {
        if (!this.#free(true)) break;
        queue.delete(entry.credential);
        const answer = this.#fly(entry.credential, entry.epoch, entry.ask, true);
        this.#settle(entry, (waiter) => waiter.resolve(answer));
      }
    if (this.#empty()) this.#disarm();
  }

  /** Refuse the waiters whose deadline passed, oldest first, then wait for the next one's. */
  #expire(): void {
    this.#timer = undefined;
    const now = performance.now();
    for (const queue of [this.#head, this.#queue])
      for (const entry of queue.values()) {
        if (entry.deadline > now) break;
        queue.delete(entry.credential);
        this.#settle(entry, (waiter) => {
          this.refused++;
          waiter.reject(this.refusal("waited"));
        });
      }
    this.#arm();
  }

  #settle(entry: Queued<T>, settle: (waiter: Waiter<T>) => void): void {
    for (const waiter of entry.waiters) {
      waiter.off();
      this.#waiting--;
      settle(waiter);
    }
    entry.waiters.clear();
  }

  /** The one timer: the oldest entry's deadline, of either queue. */
  #arm(): void {
    if (this.#timer !== undefined) return;
    const deadline = Math.min(
      this.#head.values().next().value?.deadline ?? Number.POSITIVE_INFINITY,
      this.#queue.values().next().value?.deadline ?? Number.POSITIVE_INFINITY,
    );
    if (deadline === Number.POSITIVE_INFINITY) return;
    const delay = Math.max(1, Math.ceil(deadline - performance.now()));
    this.#timer = setTimeout(() => this.#expire(), delay);
    this.#timer.unref();
  }

  #disarm(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
