/**
 * VerifyCredential calls in flight, by credential, each with the revocation watch's epoch
 * when it was asked: concurrent calls for one credential share one answer. A call asked
 * before an event (or a loss of the stream) may carry an answer the event revokes, so it
 * is joined only by calls at the epoch it was asked in; a later call asks again.
 *
 * At most `max` distinct credentials are asked at once: the service's callers choose the
 * credentials, and each one not yet known was one more call to Tessera held in memory
 * (queued behind the connection's stream limit) for as long as the caller kept sending new
 * ones. Past it a call is refused with `refusal()` at once, and counted.
 */
export class VerifyFlights<T> {
  readonly #flights = new Map<string, { epoch: number; answer: Promise<T> }>();
  /** Calls refused because `max` credentials were being asked already. */
  refused = 0;

  constructor(
    private readonly max = Number.POSITIVE_INFINITY,
    private readonly refusal: () => Error = () => new Error("too many verifications in flight"),
  ) {}

  /** The answer for `credential`: the flight asked at `epoch`, else `ask()`'s. */
  answer(credential: string, epoch: number, ask: () => Promise<T>): Promise<T> {
    const pending = this.#flights.get(credential);
    if (pending !== undefined && pending.epoch === epoch) return pending.answer;
    if (pending === undefined && this.#flights.size >= this.max) {
      this.refused++;
      return Promise.reject(this.refusal());
    }
    const flight = {
      epoch,
      answer: ask().finally(() => {
        if (this.#flights.get(credential) === flight) this.#flights.delete(credential);
      }),
    };
    this.#flights.set(credential, flight);
    return flight.answer;
  }
}
