// The admissions of streaming calls kept alive: a stream admitted once must not outlive
// its credential, session, subject or tenant, nor the revocation stream that vouched for it.
import { refusalOf, TesseraAuthError } from "./errors.js";
import type { TesseraPrincipal } from "./principal.js";
import { authorize, type DownstreamRule } from "./verdicts.js";
import { names, type RevocationTarget } from "./verified-cache.js";

/** A streaming call's admission, held while the stream runs. */
export interface StreamHold {
  /** The principal the stream was admitted as. */
  readonly principal: TesseraPrincipal;
  /**
   * Aborted when the admission no longer holds, its reason the {@link TesseraAuthError} a
   * new call with the same credential would get (or UNAVAILABLE when Tessera cannot answer).
   */
  readonly signal: AbortSignal;
  /** Forget the stream (it ended): idempotent, and what keeps the registry from leaking. */
  release(): void;
}

/** What {@link StreamHolds} asks of the core. */
export interface StreamHoldsOptions {
  /**
   * The core's authentication of a new call (then authorized against the stream's rule).
   * With `wait`, a re-check that may wait for a verification slot when none is free (see
   * VerifyFlights; `first`: ahead of the others), rejected with `wait.signal`'s reason once
   * it aborts while waiting. @throws
   */
  authenticate(
    authorization: string | undefined,
    thumbprint: string | undefined,
    clientAddress: string | undefined,
    wait?: { signal: AbortSignal; first?: boolean },
  ): Promise<TesseraPrincipal>;
  /** Whether the revocation watch vouches for what it has not reported. */
  watching(): boolean;
  /**
   * Whether `principal` was admitted by a credential the watch cannot vouch for (an access
   * token whose authority came from a client certificate: another binding can take the
   * certificate with no event naming it): its stream is re-checked every `recheckMs`, as
   * while the watch is down.
   */
  exact?(principal: TesseraPrincipal): boolean;
  now(): number;
  /** The refusal a stream ends with when a check fails with `err`, reporting a bug (default: `refusalOf`, unreported). */
  refusalOf?(err: unknown): TesseraAuthError;
  /**
   * Streams admitted at once (default 10,000); one more is refused (RATE_LIMITED), never
   * admitted unwatched. A call still being verified is not counted.
   */
  max?: number;
  /**
   * How often a stream nothing vouches for (the watch down, or off) is verified again
   * (default {@link RECHECK_MS}): after between all of it and 6/5 of it, at random.
   */
  recheckMs?: number;
}

interface Held {
  readonly authorization: string | undefined;
  /** The connection's certificate, until its end passes (then none, as on a new call). */
  thumbprint: string | undefined;
  /** The last instant (epoch ms, inclusive) the certificate stands for the thumbprint. */
  readonly certificateEnd: number;
  readonly clientAddress: string | undefined;
  readonly rule: DownstreamRule;
  readonly controller: AbortController;
  /** Undefined until the first verification answers: then any event or loss may concern it. */
  principal: TesseraPrincipal | undefined;
  checking: boolean;
  /** Something that may concern the stream arrived during a check: check again after it. */
  again: boolean;
  /** Its last check was vouched for by a healthy watch (whose loss must then check it again). */
  vouched: boolean;
  /** Past its first verification: counted against `max`. */
  admitted: boolean;
  /** An event (or its certificate's end) concerns it: its next check must not wait for a slot. */
  urgent: boolean;
  /** Its next check is the periodic one while the watch is down: it waits at the queue's head. */
  periodic: boolean;
  /** Aborted to take its check out of the wait for a verification slot (with {@link LEFT}). */
  waiting: AbortController | undefined;
  timer: NodeJS.Timeout | undefined;
}

/**
 * How often a stream nothing vouches for is verified again (plus up to a fifth, at random),
 * and so how long a re-check may wait for a verification slot (the core's VerifyFlights): a
 * stream nothing vouches for runs that long between checks anyway.
 */
export const RECHECK_MS = 5000;

/** The reason a re-check's wait for a slot is aborted with: not a refusal, it left. */
const LEFT = new TesseraAuthError("UNAVAILABLE", "the re-check stopped waiting for a verification slot");

function tooMany(): TesseraAuthError {
  return new TesseraAuthError("RATE_LIMITED", "too many streams open: retry later", { retryAfterSeconds: 1 });
}

function ignore(): void {}

/** setTimeout's longest delay; a later deadline is reached in several waits. */
const MAX_DELAY_MS = 2 ** 31 - 1;

/**
 * The registry of held streams. Each is verified again — exactly as a new call with its
 * Authorization header would be, so the error it ends with is the one that call would get —
 * when a revocation event names its principal (the cache's own rule, {@link names}), when
 * the watch that vouched for it is lost or reset, and every `recheckMs` while nothing
 * vouches for it; it ends at its credential's expiry. A check that arrives while another
 * runs makes it run once more, so an event during Tessera's answer is never missed.
 *
 * A loss re-checks every stream the watch vouched for at once, and Tessera ends the watch
 * about hourly: those re-checks wait, first in first out, for one of the core's verification
 * slots (up to {@link RECHECK_MS}) rather than being refused when more distinct credentials
 * are held than the slots. Meanwhile the stream runs on its last admission, as during any
 * re-check, and nothing else is admitted on it: the cache is empty since the loss, so a new
 * call with its credential is verified by Tessera (the waiting re-checks leave it a share of
 * the slots). An event naming a waiting stream takes it out of the queue and checks it at
 * once. The re-check every `recheckMs` while nothing vouches for a stream (the watch down:
 * no event would come) waits at the head of the queue, ahead of a loss's, within the same
 * share, so that a flood of new calls (anyone can send them) never ends it: only a wait of
 * {@link RECHECK_MS} does. A stream whose credential the watch can never vouch for (see
 * `exact`) is re-checked so too, the watch up or not; while it is up, its re-check waits in
 * the queue behind a loss's, as they do. Its timer fires after between
 * `recheckMs` and 6/5 of it, at random: a loss re-checks every stream at once, and their
 * timers would fire in bursts; never sooner, so that they do not go ahead of the loss's
 * re-checks still waiting (each waits {@link RECHECK_MS} at most). A revocation Tessera records while nothing vouches for a
 * stream ends it within 6/5 `recheckMs` + {@link RECHECK_MS} + 2 x the longest verification
 * (a check that answered just before it, the timer, the wait, the check that answers it).
 */
export class StreamHolds {
  readonly #held = new Set<Held>();
  /**
   * Of those, the admitted ones. Calls still being verified are held too (an event during
   * their first answer must be seen) but not counted: anyone can send those, without any
   * credential Tessera knows, for as long as Tessera takes to answer.
   */
  #admitted = 0;
  readonly #o: StreamHoldsOptions;
  readonly #max: number;
  readonly #recheckMs: number;
  readonly #refusalOf: (err: unknown) => TesseraAuthError;

  constructor(options: StreamHoldsOptions) {
    this.#o = options;
    this.#refusalOf = options.refusalOf ?? ((err) => refusalOf(err, ignore));
    this.#max = options.max ?? 10_000;
    this.#recheckMs = options.recheckMs ?? RECHECK_MS;
  }

  get size(): number {
    return this.#held.size;
  }

  /** Admit a stream and hold it. @throws TesseraAuthError as the call's refusal */
  async hold(
    authorization: string | undefined,
    thumbprint: string | undefined,
    rule: DownstreamRule,
    clientAddress?: string,
    certificateEnd = Number.POSITIVE_INFINITY,
  ): Promise<StreamHold> {
    if (this.#admitted >= this.#max) throw tooMany();
    const held: Held = {
      authorization,
      thumbprint,
      certificateEnd,
      clientAddress,
      rule,
      controller: new AbortController(),
      principal: undefined,
      checking: false,
      again: false,
      vouched: false,
      admitted: false,
      urgent: false,
      periodic: false,
      waiting: undefined,
      timer: undefined,
    };
    // Registered before the first answer, so that an event or a loss during it is seen.
    this.#held.add(held);
    try {
      await this.#check(held);
    } catch (err) {
      this.#drop(held);
      throw err;
    }
    // Ended meanwhile (the core closed): the call is refused as the stream would have ended.
    if (held.controller.signal.aborted) throw held.controller.signal.reason;
    // Counted once admitted: calls verified at the same time may have filled the slots meanwhile.
    if (this.#admitted >= this.#max) {
      this.#drop(held);
      throw tooMany();
    }
    held.admitted = true;
    this.#admitted++;
    return {
      principal: held.principal!,
      signal: held.controller.signal,
      release: () => this.#drop(held),
    };
  }

  /** A revocation event: the streams whose principal it names are verified again. */
  onEvent(target: RevocationTarget, id: string): void {
    for (const held of this.#held)
      if (held.principal === undefined || names(target, id, held.principal)) this.#poke(held, true);
  }

  /** The watch was lost or reset: every stream it vouched for is verified again. */
  onLost(): void {
    for (const held of this.#held) if (held.vouched || held.principal === undefined) this.#poke(held);
  }

  /** End every held stream with `err` (the core is closing). */
  endAll(err: TesseraAuthError): void {
    for (const held of [...this.#held]) this.#end(held, err);
  }

  async #check(held: Held): Promise<void> {
    held.checking = true;
    try {
      // Let the rest of the watch's message apply first (its later events, the cache's drops).
      await undefined;
      // Released (or ended) meanwhile, in the tick of the loss: nobody asks Tessera for it.
      if (!this.#held.has(held)) return;
      do {
        held.again = false;
        held.vouched = this.#o.watching();
        const principal = await this.#authenticate(held);
        // Its wait was cancelled: an event came (checked again at once), or the stream ended.
        if (principal === undefined) continue;
        authorize(principal, held.rule);
        held.principal = principal;
        if (this.#o.exact?.(principal)) held.vouched = false;
      } while (held.again && this.#held.has(held));
    } finally {
      held.checking = false;
    }
    this.#arm(held);
  }

  /**
   * One authentication of the stream. A re-check of an admitted stream (after a loss of the
   * watch, or while nothing vouches for it) may wait for a verification slot, as every held
   * stream is re-checked at once after a loss: the stream runs on its last admission meanwhile,
   * as during any re-check; the periodic one, while the watch is down, waits ahead of
   * those. A first check does not (a new call is refused at once, 503), nor one an event or
   * the certificate's end asked for: it is answered at once, or refused 503 at once when no
   * slot is free, never left waiting behind the others. Undefined: the wait was cancelled
   * (see {@link #poke} and {@link #drop}).
   */
  async #authenticate(held: Held): Promise<TesseraPrincipal | undefined> {
    const { authorization, thumbprint, clientAddress } = held;
    const urgent = held.urgent || !held.admitted;
    const first = held.periodic;
    held.urgent = false;
    held.periodic = false;
    if (urgent) return this.#o.authenticate(authorization, thumbprint, clientAddress);
    const waiting = new AbortController();
    held.waiting = waiting;
    try {
      return await this.#o.authenticate(authorization, thumbprint, clientAddress, {
        signal: waiting.signal,
        first,
      });
    } catch (err) {
      if (err === LEFT) return undefined;
      throw err;
    } finally {
      if (held.waiting === waiting) held.waiting = undefined;
    }
  }

  /** Check the stream again (`urgent`: without waiting for a slot, its wait, if any, cut short). */
  #poke(held: Held, urgent = false): void {
    if (urgent) held.urgent = true;
    if (held.checking) {
      held.again = true;
      if (urgent) held.waiting?.abort(LEFT);
    } else this.#check(held).catch((err: unknown) => this.#end(held, this.#refusalOf(err)));
  }

  /**
   * The stream's next deadline: its credential's expiry, its certificate's end (TLS checked
   * it at the handshake only: past it, the stream is verified again without it, so a bound
   * credential is refused as on a new call), and a re-check while nothing vouches for it.
   */
  #arm(held: Held): void {
    clearTimeout(held.timer);
    held.timer = undefined;
    if (!this.#held.has(held)) return;
    const expires = held.principal?.expiresAt?.getTime() ?? Number.POSITIVE_INFINITY;
    const now = this.#o.now();
    if (expires <= now) {
      this.#end(held, expired(held.principal!));
      return;
    }
    if (this.#certificateEnded(held, now)) {
      this.#poke(held, true);
      return;
    }
    const certificateEnd = held.thumbprint === undefined ? Number.POSITIVE_INFINITY : held.certificateEnd;
    const delay = Math.min(
      expires - now,
      certificateEnd + 1 - now,
      held.vouched ? MAX_DELAY_MS : Math.ceil(this.#recheckMs * (1 + 0.2 * Math.random())),
      MAX_DELAY_MS,
    );
    // A re-check (or a step towards a deadline past setTimeout's range) checks again when it fires.
    const deadline = delay === Math.min(expires - now, certificateEnd + 1 - now);
    held.timer = setTimeout(() => {
      held.timer = undefined;
      const at = this.#o.now();
      if (at >= expires) this.#end(held, expired(held.principal!));
      else if (this.#certificateEnded(held, at)) this.#poke(held, true);
      // A re-check while nothing vouches for the stream (no event would come for a
      // revocation): while the watch is down, at the head of the queue, ahead of a loss's
      // re-checks. While it is up (a credential it cannot vouch for: see `exact`), behind them:
      // enough such streams would otherwise take every slot the loss's re-checks wait for.
      else if (!deadline) {
        held.periodic = !this.#o.watching();
        this.#poke(held);
      }
      // A timer can fire a millisecond before Date.now() reaches its deadline: wait the rest
      // rather than verify again with the certificate it is about to drop.
      else this.#arm(held);
    }, delay);
    held.timer.unref();
  }

  /** Whether the held certificate's end has passed at `now`: then it is dropped from the stream. */
  #certificateEnded(held: Held, now: number): boolean {
    if (held.thumbprint === undefined || now <= held.certificateEnd) return false;
    held.thumbprint = undefined;
    return true;
  }

  #end(held: Held, err: TesseraAuthError): void {
    if (!this.#held.has(held)) return;
    this.#drop(held);
    held.controller.abort(err);
  }

  #drop(held: Held): void {
    if (this.#held.delete(held) && held.admitted) this.#admitted--;
    clearTimeout(held.timer);
    held.timer = undefined;
    // Gone: its re-check leaves the queue, so that nobody asks Tessera for it.
    held.waiting?.abort(LEFT);
  }
}

/** The refusal a new call with an expired credential gets (offline for a JWT, by Tessera otherwise). */
function expired(principal: TesseraPrincipal): TesseraAuthError {
  return new TesseraAuthError(
    "TOKEN_EXPIRED",
    principal.credentialKind === "jwt" ? "access token expired" : "credential expired",
  );
}
