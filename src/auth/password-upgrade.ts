import { hashOutdated, hashSecret } from "./password.js";

/** Counters of a {@link PasswordUpgrader} (metrics, tests). */
export interface PasswordUpgradeStats {
  /** Stored hashes replaced by one at the current parameters. */
  upgraded: number;
  /** Upgrades not tried because the hash pool had no room in time: the next login tries again. */
  deferred: number;
  /** Upgrades whose new hash could not be stored: the next login tries again. */
  failed: number;
}

/**
 * Stores the new hash in place of `from` (compare-and-set: a password changed meanwhile
 * must not be put back); resolves to whether a row changed.
 */
export type StoreUpgradedHash = (from: string, to: string) => Promise<boolean>;

/** Where a refused store is reported (without secrets). */
export interface UpgradeLogger {
  warn(obj: object, msg: string): void;
  info?(obj: object, msg: string): void;
}

/**
 * Re-hashes a user's password, after a check that accepted it, when its stored hash was
 * made with other parameters than `auth.passwordIterations` (Django's and Passlib's
 * remedy): an unknown name costs a stand-in hash at the current parameters, so until every
 * account converges on them, an older hash's other cost tells existing accounts apart by
 * timing. Shared by every check of a user's password (Login, HTTP Basic), so they count alike.
 *
 * Never fails the login it follows: the new hash is computed on the hash pool as a check's
 * tail (purpose "verify": within the pool's bounds and deadline, so a login under load still
 * gets its answer in time), and a refused hash or store is counted and left for the next login.
 */
export class PasswordUpgrader {
  private readonly counters: PasswordUpgradeStats = { upgraded: 0, deferred: 0, failed: 0 };
  /** Users whose upgrade is under way: concurrent logins of one user hash once. */
  private readonly inflight = new Set<string>();
  /** Whether the last store failed (a run of failures is logged once). */
  private failing = false;

  constructor(
    readonly iterations: number,
    private readonly logger?: UpgradeLogger,
  ) {}

  /**
   * Replace `stored`, the hash `password` was just verified against, when it is outdated.
   * Never throws.
   */
  async upgrade(userId: string, password: string, stored: string, store: StoreUpgradedHash): Promise<void> {
    if (!hashOutdated(stored, this.iterations) || this.inflight.has(userId)) return;
    this.inflight.add(userId);
    try {
      let fresh: string;
      try {
        fresh = await hashSecret(password, this.iterations, "verify");
      } catch {
        // The pool is full or late (Unavailable): a later login finds room.
        this.counters.deferred++;
        return;
      }
      try {
        // false: the hash changed meanwhile (a password change, another instance's upgrade).
        if (await store(stored, fresh)) this.counters.upgraded++;
        if (this.failing) {
          this.failing = false;
          this.logger?.info?.({}, "password hashes stored again");
        }
      } catch (err) {
        this.counters.failed++;
        if (!this.failing) {
          this.failing = true;
          this.logger?.warn(
            { err: err instanceof Error ? err.name : "error", user: userId },
            "password hash not upgraded to the current iterations; the next successful login tries again",
          );
        }
      }
    } finally {
      this.inflight.delete(userId);
    }
  }

  stats(): PasswordUpgradeStats {
    return { ...this.counters };
  }
}
