import type { TesseraError } from "../errors.js";
import { dummyPasswordHash, hashOutdated, hashParametersDiffer, hashSecret } from "./password.js";

/** Whose secret is re-hashed: a user's password, or a machine user's Basic secret. */
export type UpgradedSecret = "user" | "machine";

/** Every {@link UpgradedSecret}, in the order metrics list them. */
export const UPGRADED_SECRETS: readonly UpgradedSecret[] = ["user", "machine"];

/** Counters of a {@link PasswordUpgrader} for one kind of secret (metrics, tests). */
export interface PasswordUpgradeStats {
  /** Stored hashes replaced by one at the current parameters. */
  upgraded: number;
  /** Upgrades not tried because the hash pool had no room in time: the next check tries again. */
  deferred: number;
  /** Upgrades whose new hash could not be stored: the next check tries again. */
  failed: number;
}

/**
 * Stores the new hash in place of `from` (compare-and-set: a password changed or a
 * credential rotated meanwhile must not be put back); resolves to whether a row changed.
 */
export type StoreUpgradedHash = (from: string, to: string) => Promise<boolean>;

/** Where a refused store is reported (without secrets). */
export interface UpgradeLogger {
  warn(obj: object, msg: string): void;
  info?(obj: object, msg: string): void;
}

/**
 * Re-hashes a password (a user's, or a machine user's generated Basic secret), after a check
 * that accepted it, when its stored hash is weaker than one at `auth.passwordIterations`
 * (Django's and Passlib's remedy; never a stronger one): an unknown name costs a stand-in
 * hash at the current parameters, so until every account converges on them, an older hash's
 * other cost tells existing accounts apart by timing. Shared by every check of such a secret
 * (Login, HTTP Basic, OAuth client authentication, VerifyCredential), so they count alike.
 *
 * Never fails the call it follows: the new hash is computed on the hash pool as a check's
 * tail (purpose "verify": within the pool's bounds and deadline, so a call under load still
 * gets its answer in time), and a refused hash or store is counted and left for the next check.
 */
export class PasswordUpgrader {
  private readonly counters: Record<UpgradedSecret, PasswordUpgradeStats> = {
    user: { upgraded: 0, deferred: 0, failed: 0 },
    machine: { upgraded: 0, deferred: 0, failed: 0 },
  };
  /** Secrets whose upgrade is under way: concurrent checks of one secret hash once. */
  private readonly inflight = new Set<string>();
  /** Whether the last store failed (a run of failures is logged once). */
  private failing = false;
  /** How a hash made here at `iterations` starts (see {@link outdated}). */
  private readonly currentPrefix: string;

  constructor(
    readonly iterations: number,
    private readonly logger?: UpgradeLogger,
  ) {
    this.currentPrefix = `pbkdf2-sha256$${iterations}$`;
  }

  /** Whether `stored` has the very shape hashSecret gives at `iterations` (no parse needed). */
  private current(stored: string): boolean {
    const p = this.currentPrefix.length;
    return (
      stored.length === p + 69 &&
      stored.startsWith(this.currentPrefix) &&
      stored.endsWith("==", p + 24) &&
      stored.charCodeAt(p + 24) === 36 && // "$"
      stored.endsWith("=") &&
      !stored.endsWith("==")
    );
  }

  /**
   * {@link hashOutdated}, without parsing the hash when it has the very shape hashSecret
   * gives at `iterations` (a 16-byte salt and a 32-byte hash, padded base64): every accepted
   * Basic check asks (before {@link upgrade}, so that a current hash costs no promise), and
   * nearly every hash is one.
   */
  outdated(stored: string): boolean {
    return !this.current(stored) && hashOutdated(stored, this.iterations);
  }

  /**
   * Replace `stored`, the hash `password` was just verified against, when it is outdated.
   * `id`: the user's id, or the machine credential's. Never throws.
   * @returns the new hash once stored; undefined when nothing was (current already, under way, deferred, failed)
   */
  async upgrade(
    kind: UpgradedSecret,
    id: string,
    password: string,
    stored: string,
    store: StoreUpgradedHash,
  ): Promise<string | undefined> {
    if (!this.outdated(stored)) return undefined;
    const key = `${kind}:${id}`;
    if (this.inflight.has(key)) return undefined;
    const counters = this.counters[kind];
    this.inflight.add(key);
    try {
      let fresh: string;
      try {
        fresh = await hashSecret(password, this.iterations, "verify");
      } catch {
        // The pool is full or late (Unavailable): a later check finds room.
        counters.deferred++;
        return undefined;
      }
      try {
        // false: the hash changed meanwhile (a password change, a rotation, another instance's upgrade).
        const replaced = await store(stored, fresh);
        if (replaced) counters.upgraded++;
        if (this.failing) {
          this.failing = false;
          this.logger?.info?.({}, "password hashes stored again");
        }
        return replaced ? fresh : undefined;
      } catch (err) {
        counters.failed++;
        if (!this.failing) {
          this.failing = true;
          this.logger?.warn(
            { err: err instanceof Error ? err.name : "error", kind, id },
            "password hash not upgraded to the current iterations; the next successful check tries again",
          );
        }
        return undefined;
      }
    } finally {
      this.inflight.delete(key);
    }
  }

  /**
   * What a refused account's presented password (a disabled user or machine user, or
   * tenant) is checked against: its own hash at the current parameters, else the stand-in
   * an unknown name is checked against. The answer is a refusal either way; this keeps its
   * cost the unknown name's, since a refused account's hash is never upgraded.
   * `forbidden`: as for {@link dummyPasswordHash}.
   */
  refusalHash(stored: string, forbidden?: TesseraError): Promise<string> {
    // Any other parameters, stronger ones too (a hash another instance made at a higher count).
    return !this.current(stored) && hashParametersDiffer(stored, this.iterations)
      ? dummyPasswordHash(this.iterations, forbidden)
      : Promise.resolve(stored);
  }

  stats(): Record<UpgradedSecret, PasswordUpgradeStats> {
    return { user: { ...this.counters.user }, machine: { ...this.counters.machine } };
  }
}
