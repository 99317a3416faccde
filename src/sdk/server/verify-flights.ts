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
  /** Asked for a call that may wait: it holds one of their share of the slots. */
  readonly waitable: boolean;
  /** An exact credential's next ask, joined by the calls that arrived while this one flies. */
  follow?: FollowUp<T>;
}

/** The ask made in a flight's slot once it ends, for calls that began after it was asked. */
interface FollowUp<T> {
  readonly ask: () => Promise<T>;
  readonly waiters: Set<Joiner<T>>;
}

/** A call joining a follow-up, with how it may wait for a slot (none: it may not). */
interface Joiner<T> extends Waiter<T> {
  readonly wait?: SlotWait;
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
 * is joined only by calls at the epoch it was asked in; a later call asks again.
 *
 * At most `max` distinct credentials are asked at once: the service's callers choose the
 * credentials, and each one not yet known was one more call to Tessera held in memory
 * (queued behind the connection's stream limit) for as long as the caller kept sending new
 * ones. Past it a call is refused with `refusal("busy")` at once, and counted.
 *
 * Except a call that may wait (a held stream's re-check: see StreamHolds): it waits, first
 * in first out, for a slot, and is refused with `refusal("waited")` (counted once) only when
 * `waitMs` pass first. Such calls fly in at most {@link recheckShare} of the slots (3/4 of
 * `max`, at least 1): a loss re-checks every held stream at once, and without it the queue
 * took every slot as it freed, refusing each new call (and each urgent re-check) for as long
 * as it lasted. The rest stay free for calls that may not wait. A flight ending hands its
 * slot to the oldest waiting credential while those fly in fewer than their share, before
 * anything else runs; calls asked to wait `first` (the periodic re-check while the watch is
 * down) are served before all the others, first in first out among themselves. A call that
 * may wait and would replace a flight of a call that may not (at an older epoch) waits too
 * when the share is taken: it would hold one more slot of it. Waiters for one credential
 * wait as one entry and share its flight; one timer, for the oldest entry's deadline,
 * serves both queues (deadlines are in arrival order in each). A waiter leaves when its
 * signal aborts.
 *
 * An `exact` credential (one whose answer may change with no event: see VerifyFlights.answer)
 * is never answered by a flight asked before the call began, yet asked by one flight at a
 * time: the calls arriving while it flies join one follow-up, asked when it ends. Each new
 * call asking at once instead let anyone holding such a token, or forging one where JWTs go
 * to Tessera, keep any number of asks at Tessera in one slot. The follow-up takes the slot
 * as its joiners' own call would, after the waiting calls were served: handed on for good, a
 * busy token's chain kept it from them. A joiner leaves when its signal aborts; a follow-up nobody
 * joins any more is not asked.
 */
export class VerifyFlights<T> {
  readonly #flights = new Map<string, Flight<T>>();
  /** Flights asked for calls that may wait (counted against {@link recheckShare}). */
  #waitable = 0;
  /** Slots calls that may wait fly in at most: 3/4 of `max`, at least 1. */
  readonly recheckShare: number;
  /** Waiting credentials, oldest first (a Map keeps insertion order and deletes in O(1)). */
  readonly #queue = new Map<string, Queued<T>>();
  /** Those waiting `first`, served before {@link #queue} (a credential may wait in both). */
  readonly #head = new Map<string, Queued<T>>();
  #timer: NodeJS.Timeout | undefined;
  #waiting = 0;
  /** Calls refused: `max` credentials were being asked already (at once, or past the wait). */
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
   * The answer for `credential`: the flight asked at `epoch`, else `ask()`'s. With `wait`,
   * the call waits for a slot when none is free (until `waitMs`, or `wait.signal` aborts:
   * then it is rejected with the signal's reason); `wait.first`: ahead of those that do not.
   * `exact`: whatever the epoch, a flight asked before the call began never answers it; one
   * in flight is followed up (see the class).
   */
  answer(
    credential: string,
    epoch: number,
    ask: () => Promise<T>,
    wait?: SlotWait,
    exact = false,
  ): Promise<T> {
    const pending = this.#flights.get(credential);
    if (exact && pending !== undefined) return this.#follow(pending, ask, wait);
    if (pending !== undefined && pending.epoch === epoch) return pending.answer;
    if (wait !== undefined) {
      const first = wait.first === true;
      const ahead = this.#head.size > 0 || (!first && this.#queue.size > 0);
      // A credential in flight at an earlier epoch is asked again in the slot it holds, but
      // one held by a call that may not wait is one more of the share.
      if (
        pending === undefined
          ? ahead || !this.#free(true)
          : !pending.waitable && this.#waitable >= this.recheckShare
      )
        return this.#enqueue(credential, epoch, ask, first, wait.signal);
    } else if (pending === undefined && !this.#free(false)) {
      this.refused++;
      return Promise.reject(this.refusal("busy"));
    }
    return this.#fly(credential, epoch, ask, wait !== undefined);
  }

  /** Whether a slot is free for a call (`waitable`: one that may wait, within its share). */
  #free(waitable: boolean): boolean {
    return this.#flights.size < this.max && (!waitable || this.#waitable < this.recheckShare);
  }

  #fly(credential: string, epoch: number, ask: () => Promise<T>, waitable: boolean): Promise<T> {
    // An ask that throws at once still makes a flight that ends: a follow-up is asked inside
    // its predecessor's end, where a throw would keep the slot for good.
    let asked: Promise<T>;
    try {
      asked = ask();
    } catch (err) {
      asked = Promise.reject(err);
    }
    const flight: Flight<T> = {
      epoch,
      waitable,
      answer: asked.finally(() => {
        if (this.#flights.get(credential) !== flight) return;
        this.#flights.delete(credential);
        if (waitable) this.#waitable--;
        this.#pump();
        if (flight.follow !== undefined) this.#followUp(credential, epoch, flight.follow);
      }),
    };
    if (this.#flights.get(credential)?.waitable) this.#waitable--;
    this.#flights.set(credential, flight);
    if (waitable) this.#waitable++;
    // A new call for a waiting credential, in a slot kept free: asked after every waiter
    // began, it answers them too (so that a waiting credential never has a flight).
    for (const queue of [this.#head, this.#queue]) {
      const queued = queue.get(credential);
      if (queued === undefined) continue;
      queue.delete(credential);
      this.#settle(queued, (waiter) => waiter.resolve(flight.answer));
    }
    if (this.#empty()) this.#disarm();
    return flight.answer;
  }

  /** Join the follow-up of `flight` (an exact credential's), until `wait.signal` aborts. */
  #follow(flight: Flight<T>, ask: () => Promise<T>, wait?: SlotWait): Promise<T> {
    const signal = wait?.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    flight.follow ??= { ask, waiters: new Set() };
    const follow = flight.follow;
    return new Promise<T>((resolve, reject) => {
      const leave = () => {
        follow.waiters.delete(joiner);
        if (follow.waiters.size === 0 && flight.follow === follow) flight.follow = undefined;
        reject(signal!.reason);
      };
      const joiner: Joiner<T> = {
        resolve,
        reject,
        wait,
        off: () => signal?.removeEventListener("abort", leave),
      };
      follow.waiters.add(joiner);
      signal?.addEventListener("abort", leave, { once: true });
    });
  }

  /**
   * Ask `follow` once its flight's slot is freed and the waiting calls were served first:
   * a chain kept its slot for good otherwise, each waiting re-check running out its wait.
   * It takes a slot as a new call of its joiners would (in the share if one may wait);
   * with none free, those that may wait queue and the others are refused at once.
   */
  #followUp(credential: string, epoch: number, follow: FollowUp<T>): void {
    const joiners = [...follow.waiters];
    for (const joiner of joiners) joiner.off();
    // The queue served may have asked it (a call that waited for it at an older epoch).
    const asked = this.#flights.get(credential);
    if (asked !== undefined) {
      for (const joiner of joiners) joiner.resolve(asked.answer);
      return;
    }
    const mayWait = joiners.some((joiner) => joiner.wait !== undefined);
    let waitable: boolean | undefined;
    if (mayWait && this.#free(true)) waitable = true;
    else if (joiners.some((joiner) => joiner.wait === undefined) && this.#free(false)) waitable = false;
    if (waitable !== undefined) {
      // Asked now, after each of its joiners began.
      const answer = this.#fly(credential, epoch, follow.ask, waitable);
      for (const joiner of joiners) joiner.resolve(answer);
      return;
    }
    for (const joiner of joiners)
      if (joiner.wait === undefined) {
        this.refused++;
        joiner.reject(this.refusal("busy"));
      } else
        this.#wait(credential, epoch, follow.ask, joiner.wait.first === true, joiner.wait.signal, joiner);
  }

  #enqueue(
    credential: string,
    epoch: number,
    ask: () => Promise<T>,
    first: boolean,
    signal?: AbortSignal,
  ): Promise<T> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<T>((resolve, reject) =>
      this.#wait(credential, epoch, ask, first, signal, { resolve, reject }),
    );
  }

  /** Queue a call (`settle`: how it is answered) for `credential`'s slot, until `signal` aborts. */
  #wait(
    credential: string,
    epoch: number,
    ask: () => Promise<T>,
    first: boolean,
    signal: AbortSignal | undefined,
    settle: Pick<Waiter<T>, "resolve" | "reject">,
  ): void {
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
    const { resolve, reject } = settle;
    const leave = () => {
      this.#leave(queued, waiter);
      reject(signal!.reason);
    };
    const waiter: Waiter<T> = { resolve, reject, off: () => signal?.removeEventListener("abort", leave) };
    queued.waiters.add(waiter);
    this.#waiting++;
    signal?.addEventListener("abort", leave, { once: true });
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
    // None that may wait starts but here while any waits. A waiting credential's flight, if
    // any, is an older epoch's (it is replaced); the same credential waiting in the other
    // queue is answered by this flight too (asked after it began waiting).
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
