import { TesseraError } from "../errors.js";
import type { MachineStateRepository } from "../storage/repositories/subject-state.js";
import type { BasicVerifier } from "./authenticator.js";
import {
  assertMachineActive,
  MACHINE_CREDENTIALS_TABLE,
  MACHINE_USERNAME_PREFIX,
  MACHINE_USERS_TABLE,
  type MachineVerifierOptions,
  machinePrincipal,
} from "./machine-principal.js";
import { dummyPasswordHash, verifySecret } from "./password.js";
import type { PasswordUpgrader } from "./password-upgrade.js";
import { walledOff } from "./principal.js";
import type { VerifiedSecretCache } from "./secret-cache.js";

/** Options of {@link createMachineBasicVerifier}. */
export interface MachineBasicVerifierOptions extends Omit<MachineVerifierOptions, "machines" | "secrets"> {
  machines: Pick<MachineStateRepository, "byCredential" | "sharedDigest" | "replaceSecretHash">;
  secrets: Pick<VerifiedSecretCache, "verify" | "remember" | "sharedDigestOf">;
  /** `auth.passwordIterations`: the stand-in hash an unknown username is checked against. */
  iterations: number;
  /** Re-hashes a verified secret whose hash has other parameters than `iterations` (shared with users'). */
  upgrader: PasswordUpgrader;
}

/**
 * `Authorization: Basic` for machine users (usernames starting with
 * {@link MACHINE_USERNAME_PREFIX}; anything else → null, left to the user verifier), also
 * OAuth client authentication and VerifyCredential's Basic pairs (admission/authenticate.ts).
 * The password is checked first (an unknown username costs one dummy PBKDF2, so timing
 * does not tell which exist), through the verified-secret cache: after first use a
 * request costs an HMAC, not PBKDF2. Wrong passwords are 401s, which the authentication
 * interceptor counts per IP, refusing the IP before any verification once over
 * `rateLimit.authFailuresPerIpPerMinute`. A secret hashed with other parameters than the
 * stand-in's is re-hashed once accepted (auth/password-upgrade.ts), as users' passwords are.
 */
export function createMachineBasicVerifier(options: MachineBasicVerifierOptions): BasicVerifier {
  const { machines, secrets, lastUsed, upgrader } = options;
  const now = options.now ?? Date.now;
  return {
    name: "machine-basic",
    async verify(username, password, state) {
      if (!username.startsWith(MACHINE_USERNAME_PREFIX)) return null;
      const cred = await machines.byCredential(username);
      const { hashingRefused } = state;
      // Behind a verification's tenant wall: as unknown, with the same dummy PBKDF2.
      if (cred?.kind !== "basic" || walledOff(state, cred.machine.tenantId)) {
        await verifySecret(
          password,
          await dummyPasswordHash(options.iterations, hashingRefused),
          hashingRefused,
        );
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      if (cred.machine.disabled || cred.machine.tenantDisabled) {
        // A disabled machine user's correct password reads exactly like a wrong one, with
        // the same full PBKDF2 each time (no verified-secret cache: no timing difference),
        // an unknown name's: its hash, never upgraded while refused, may be older.
        await verifySecret(
          password,
          await upgrader.refusalHash(cred.secretHash, hashingRefused),
          hashingRefused,
        );
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      const namespace = `machine:${cred.credentialId}`;
      const shared = machines.sharedDigest(cred);
      if (!(await secrets.verify(namespace, password, cred.secretHash, shared, hashingRefused))) {
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      if (cred.expiresAt !== null && cred.expiresAt <= now()) {
        throw new TesseraError("TOKEN_REVOKED", "credentials were replaced by a credential rotation");
      }
      assertMachineActive(cred.machine);
      // Also where hashing is refused (admission's budget-free try), unlike a user's password:
      // the shared digest recognises this secret there with no PBKDF2, after a restart too,
      // so a reserved check may never come. The secret was just proven: no budget to guard.
      const { credentialId } = cred;
      if (upgrader.outdated(cred.secretHash))
        await upgrader.upgrade("machine", credentialId, password, cred.secretHash, async (from, to) => {
          // The new hash's digest in the same write: other instances recognise it with one HMAC.
          const digest = secrets.sharedDigestOf(namespace, to, password) ?? null;
          const replaced = await machines.replaceSecretHash(credentialId, from, to, digest);
          // Made from this very secret: the next use needs no PBKDF2 to match it.
          if (replaced) secrets.remember(namespace, password, to);
          return replaced;
        });
      lastUsed.mark(MACHINE_CREDENTIALS_TABLE, credentialId);
      lastUsed.mark(MACHINE_USERS_TABLE, cred.machine.id);
      // Its end (a rotation's grace period) told, as a machine token's is: no event announces it.
      return machinePrincipal(cred.machine, "basic", state, { credentialId, expiresAt: cred.expiresAt });
    },
  };
}
