import { randomBytes, timingSafeEqual } from "node:crypto";
import type { TesseraError } from "../errors.js";
import { type HashPurpose, hashPool } from "./hash-pool.js";

/** OWASP 2023 recommendation for PBKDF2-HMAC-SHA256. */
export const DEFAULT_ITERATIONS = 600_000;
const KEY_LENGTH = 32;
const SALT_LENGTH = 16;

/**
 * Hash a secret (password or token secret) with PBKDF2-SHA256. The result is a
 * self-describing string `pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>`, so the
 * parameters are stored with each hash and can be raised later without a migration.
 * Runs on the bounded {@link hashPool}'s low-priority threads: never blocks the event loop,
 * and takes only the CPU that serving requests leaves.
 * `purpose` is "create" for a new secret (its share of the pool is bounded, see {@link HashPurpose}).
 * @throws TesseraError UNAVAILABLE (with Retry-After) when the hash pool's queue is full
 */
export async function hashSecret(
  secret: string,
  iterations = DEFAULT_ITERATIONS,
  purpose: HashPurpose = "create",
): Promise<string> {
  const salt = randomBytes(SALT_LENGTH);
  const hash = await hashPool().pbkdf2({ secret, salt, iterations, keyLength: KEY_LENGTH }, purpose);
  return `pbkdf2-sha256$${iterations}$${salt.toString("base64")}$${hash.toString("base64")}`;
}

/** The parameters stored in a hash string. */
export interface HashParameters {
  algorithm: "pbkdf2-sha256";
  iterations: number;
  salt: Buffer;
  hash: Buffer;
}

/** Parse a stored hash; null when it is not in the expected format. */
export function parseHash(stored: string): HashParameters | null {
  const parts = stored.split("$");
  if (parts.length !== 4 || parts[0] !== "pbkdf2-sha256") return null;
  const iterations = Number(parts[1]);
  if (!Number.isInteger(iterations) || iterations < 1) return null;
  return {
    algorithm: "pbkdf2-sha256",
    iterations,
    salt: Buffer.from(parts[2]!, "base64"),
    hash: Buffer.from(parts[3]!, "base64"),
  };
}

/**
 * Whether `stored` is weaker than a new hash (Passlib's "needs_update"): fewer iterations than
 * `iterations`, or a salt or hash of another length. Then a password it verified is re-hashed
 * (see PasswordUpgrader). A stronger hash is not: instances configured with different counts
 * (a rolling upgrade) would otherwise re-hash every login back and forth, and downgrade it.
 */
export function hashOutdated(stored: string, iterations: number): boolean {
  const params = parseHash(stored);
  if (!params) return false;
  return (
    params.iterations < iterations || params.hash.length !== KEY_LENGTH || params.salt.length !== SALT_LENGTH
  );
}

/**
 * Whether `stored` costs a check other than a new hash at `iterations` would (more or fewer
 * iterations, other lengths): an unknown name is checked against a stand-in at the current
 * parameters, so a refused account whose hash differs is checked against that stand-in too.
 */
export function hashParametersDiffer(stored: string, iterations: number): boolean {
  const params = parseHash(stored);
  if (!params) return false;
  return (
    params.iterations !== iterations ||
    params.hash.length !== KEY_LENGTH ||
    params.salt.length !== SALT_LENGTH
  );
}

/**
 * Constant-time verification of `secret` against a stored hash, through the bounded {@link hashPool}.
 * `forbidden`: set where hashing is refused (`RequestState.hashingRefused`), thrown instead.
 * @throws TesseraError UNAVAILABLE (with Retry-After) when the hash pool's queue is full or
 *   the verdict is not ready within its deadline
 */
export async function verifySecret(
  secret: string,
  stored: string,
  forbidden?: TesseraError,
): Promise<boolean> {
  const params = parseHash(stored);
  if (!params) return false;
  if (forbidden !== undefined) throw forbidden;
  const candidate = await hashPool().pbkdf2({
    secret,
    salt: params.salt,
    iterations: params.iterations,
    keyLength: params.hash.length,
  });
  return candidate.length === params.hash.length && timingSafeEqual(candidate, params.hash);
}

/**
 * A hash of a random password nobody knows, computed once, so that a login for an
 * unknown user costs the same PBKDF2 work as for a known one (no user enumeration by timing).
 */
const dummyHashes = new Map<number, Promise<string>>();
/** `forbidden`: set where hashing is refused (`RequestState.hashingRefused`), the refusal a new hash gets. */
export function dummyPasswordHash(
  iterations = DEFAULT_ITERATIONS,
  forbidden?: TesseraError,
): Promise<string> {
  let hash = dummyHashes.get(iterations);
  if (!hash) {
    // Not made (nor remembered) where hashing is refused: a waiting caller elsewhere would get that refusal.
    if (forbidden !== undefined) return Promise.reject(forbidden);
    // Stands in for a stored hash when a presented password is checked: a check, not a new secret.
    hash = hashSecret(randomBytes(24).toString("base64"), iterations, "verify");
    dummyHashes.set(iterations, hash);
    // A refusal by a full hash pool is not kept: the next caller tries again.
    hash.catch(() => dummyHashes.delete(iterations));
  }
  return hash;
}
