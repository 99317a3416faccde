import type { TesseraPrincipal } from "./principal.js";

/** One remembered admission. */
export interface Memo {
  principal: TesseraPrincipal;
  /** The revocation watch's epoch when admitted: any event or loss since sends the call the long way. */
  epoch: number;
  /** The offline verifier's key set then: a JWKS refresh may have removed the signing key. */
  keySet: number;
  /** Local time from which the admission no longer holds by itself (expiry, cache age, token lifetime). */
  until: number;
  /** Admitted offline (a JWT), else from the cache of Tessera's answers (for the counters). */
  offline: boolean;
}

/**
 * The principals of recent admissions, by the exact `Authorization` header value that was
 * admitted, so that the next call with the same header skips parsing, claims, revocation
 * look-ups and the principal's construction: one map look-up and three comparisons. It
 * holds only while nothing could have changed the answer — the watch's epoch moves on every
 * revocation event and every loss of the stream, the key set on every JWKS refresh — and
 * never past `until`; otherwise the call takes the full path, which remembers it again.
 * Bounded: the oldest entry goes first.
 */
export class AdmissionMemo {
  readonly #entries = new Map<string, Memo>();

  constructor(private readonly max: number) {}

  get(header: string, epoch: number, keySet: number, now: number): Memo | undefined {
    const memo = this.#entries.get(header);
    if (memo === undefined) return undefined;
    if (memo.epoch === epoch && memo.keySet === keySet && now < memo.until) return memo;
    this.#entries.delete(header);
    return undefined;
  }

  set(header: string, memo: Memo): void {
    if (this.max <= 0) return;
    if (this.#entries.size >= this.max && !this.#entries.has(header))
      this.#entries.delete(this.#entries.keys().next().value as string);
    this.#entries.set(header, memo);
  }

  clear(): void {
    this.#entries.clear();
  }
}
