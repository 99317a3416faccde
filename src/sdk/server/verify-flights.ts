/**
 * VerifyCredential calls in flight, by credential, each with the revocation watch's epoch
 * when it was asked: concurrent calls for one credential share one answer. A call asked
 * before an event (or a loss of the stream) may carry an answer the event revokes, so it
 * is joined only by calls at the epoch it was asked in; a later call asks again.
 */
export class VerifyFlights<T> {
  readonly #flights = new Map<string, { epoch: number; answer: Promise<T> }>();

  /** The answer for `credential`: the flight asked at `epoch`, else `ask()`'s. */
  answer(credential: string, epoch: number, ask: () => Promise<T>): Promise<T> {
    const pending = this.#flights.get(credential);
    if (pending !== undefined && pending.epoch === epoch) return pending.answer;
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
