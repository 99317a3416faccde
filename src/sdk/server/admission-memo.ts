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
  /**
   * Answered by Tessera: the credential as the cache of its answers holds it (the very string
   * used as that cache's key), which must still hold this principal for the memo to count.
   */
  credential?: string | undefined;
}

interface Entry extends Memo {
  header: string;
}

/** How many characters from the end of a header its fingerprint reads. */
const FINGERPRINT_CHARS = 16;

/**
 * A small number from the header's length and last characters (a JWT's signature, an opaque
 * credential's secret and checksum): the memo's key. Hashing the whole header as a Map key
 * costs a runtime call reading every character of a string that is new on every request;
 * this reads a few. Two headers with one fingerprint only share a slot: a hit still needs
 * the exact header.
 */
function fingerprint(header: string): number {
  const n = header.length;
  let h = n;
  for (let i = n > FINGERPRINT_CHARS ? n - FINGERPRINT_CHARS : 0; i < n; i++)
    h = (Math.imul(h, 31) + header.charCodeAt(i)) | 0;
  return h & 0x3fffffff;
}

/**
 * The principals of recent admissions, by the exact `Authorization` header value that was
 * admitted, so that the next call with the same header skips parsing, claims, revocation
 * look-ups and the principal's construction: one map look-up, one string comparison and
 * three number comparisons. It holds only while nothing could have changed the answer —
 * the watch's epoch moves on every revocation event and every loss of the stream, the key
 * set on every JWKS refresh — and never past `until`; otherwise the call takes the full
 * path, which remembers it again. An answer of Tessera's counts only while the cache of
 * those answers still holds it (so that cache's bound, age and eviction rule). Bounded:
 * the oldest entry goes first.
 */
export class AdmissionMemo {
  readonly #entries = new Map<number, Entry>();

  constructor(private readonly max: number) {}

  get(header: string, epoch: number, keySet: number, now: number): Memo | undefined {
    const key = fingerprint(header);
    const memo = this.#entries.get(key);
    if (memo === undefined || memo.header !== header) return undefined;
    if (memo.epoch === epoch && memo.keySet === keySet && now < memo.until) return memo;
    this.#entries.delete(key);
    return undefined;
  }

  set(header: string, memo: Memo): void {
    if (this.max <= 0) return;
    const key = fingerprint(header);
    if (this.#entries.size >= this.max && !this.#entries.has(key))
      this.#entries.delete(this.#entries.keys().next().value as number);
    this.#entries.set(key, { ...memo, header });
  }

  get size(): number {
    return this.#entries.size;
  }

  clear(): void {
    this.#entries.clear();
  }
}
