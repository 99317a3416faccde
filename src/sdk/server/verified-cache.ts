import type { TesseraPrincipal } from "./principal.js";

interface Entry {
  principal: TesseraPrincipal;
  /** Local time after which the entry is not served. */
  until: number;
}

/** What a revocation event names. */
export type RevocationTarget = "credential" | "session" | "subject" | "tenant";

/**
 * Whether a revocation event invalidates what was admitted as `principal`: its credential,
 * session, subject or tenant. One rule for the cache and for the streams kept open.
 */
export function names(target: RevocationTarget, id: string, principal: TesseraPrincipal): boolean {
  return target === "credential"
    ? principal.credentialId === id
    : target === "session"
      ? principal.sessionId === id
      : target === "subject"
        ? principal.id === id
        : principal.tenantId === id;
}

/**
 * The positive answers of VerifyCredential, by credential: bounded in number (least
 * recently used out first) and in age, dropped by the revocation events that name their
 * credential, session, subject or tenant. Only VALID answers are ever stored.
 */
export class VerifiedCache {
  readonly #entries = new Map<string, Entry>();
  readonly #max: number;
  readonly #ttlMs: number;
  readonly #now: () => number;

  constructor(options: { max: number; ttlMs: number; now: () => number }) {
    this.#max = options.max;
    this.#ttlMs = options.ttlMs;
    this.#now = options.now;
  }

  get size(): number {
    return this.#entries.size;
  }

  get(credential: string): TesseraPrincipal | undefined {
    const entry = this.#entries.get(credential);
    if (entry === undefined) return undefined;
    if (entry.until <= this.#now()) {
      this.#entries.delete(credential);
      return undefined;
    }
    // Most recently used last: the Map's order is the eviction order.
    this.#entries.delete(credential);
    this.#entries.set(credential, entry);
    return entry.principal;
  }

  /** Store a VALID answer; returns the local time it is served until (0: not stored). */
  set(credential: string, principal: TesseraPrincipal): number {
    if (this.#max <= 0) return 0;
    const now = this.#now();
    const expires = principal.expiresAt?.getTime() ?? Number.POSITIVE_INFINITY;
    const until = Math.min(now + this.#ttlMs, expires);
    if (until <= now) return 0;
    this.#entries.delete(credential);
    while (this.#entries.size >= this.#max) this.#entries.delete(this.#entries.keys().next().value as string);
    this.#entries.set(credential, { principal, until });
    return until;
  }

  /** Until when the answer for `credential` is served (0: none is held). */
  until(credential: string): number {
    return this.#entries.get(credential)?.until ?? 0;
  }

  /** Drop every answer the event invalidates. */
  invalidate(target: RevocationTarget, id: string): number {
    let dropped = 0;
    for (const [credential, { principal }] of this.#entries) {
      if (names(target, id, principal)) {
        this.#entries.delete(credential);
        dropped++;
      }
    }
    return dropped;
  }

  clear(): void {
    this.#entries.clear();
  }
}
