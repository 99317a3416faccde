// The credentials Tessera accepts and the order each kind is tried in (cheapest first), built
// from configuration: the one place that says what can authenticate a caller.
import type { Clock } from "../clock.js";
import type { Config } from "../config.js";
import type { CredentialRepository } from "../storage/repositories/credentials.js";
import type { MachineStateRepository, UserStateRepository } from "../storage/repositories/subject-state.js";
import { createAdminTokenVerifier } from "./admin-token.js";
import { Authenticator, createJwtBearerVerifier } from "./authenticator.js";
import type { JwtService } from "./jwt.js";
import type { LastUsedTracker } from "./last-used.js";
import { createMachineBasicVerifier } from "./machine-basic.js";
import {
  createMachineBearerVerifier,
  createMachineCertificateVerifier,
  createMachineClaimsLoader,
  MACHINE_USERNAME_PREFIX,
} from "./machine-principal.js";
import type { PasswordUpgrader } from "./password-upgrade.js";
import type { VerifiedSecretCache } from "./secret-cache.js";
import { createApiTokenVerifier } from "./token-verifier.js";
import { createUserBasicVerifier, createUserClaimsLoader } from "./user-principal.js";

/** What the verifiers read and share. */
export interface VerifierChainDeps {
  jwt: JwtService;
  users: UserStateRepository;
  machines: MachineStateRepository;
  credentials: CredentialRepository;
  secrets: VerifiedSecretCache;
  lastUsed: LastUsedTracker;
  clock: Clock;
  /** Re-hashes a verified password (a user's, a machine user's Basic secret) whose hash is outdated (shared with Login). */
  passwords: PasswordUpgrader;
}

/** The authenticator with every verifier the configuration enables, in the order they are tried. */
export function createVerifierChain(config: Config, deps: VerifierChainDeps): Authenticator {
  const { jwt, users, machines, credentials, secrets, lastUsed, clock } = deps;
  const authenticator = new Authenticator();
  // The static admin token first: one SHA-256, cheaper than any other check.
  if (config.admin.token) authenticator.bearer.push(createAdminTokenVerifier(config.admin.token));
  authenticator.bearer.push(
    createJwtBearerVerifier(jwt, {
      user: createUserClaimsLoader(users, { sessionMaxLifetime: config.auth.sessionMaxLifetime, now: clock }),
      machine: createMachineClaimsLoader(machines, clock),
    }),
  );
  authenticator.bearer.push(
    createApiTokenVerifier({
      credentials,
      secrets,
      lastUsed,
      patPrefix: config.auth.tokens.patPrefix,
      apiKeyPrefix: config.auth.tokens.apiKeyPrefix,
      otherPrefixes: [config.auth.tokens.machinePrefix],
      now: clock,
    }),
  );
  if (config.auth.basic.enabled) {
    authenticator.basic.push(
      createUserBasicVerifier({
        users,
        secrets,
        iterations: config.auth.passwordIterations,
        reservedPrefixes: [MACHINE_USERNAME_PREFIX],
        upgrader: deps.passwords,
      }),
    );
  }
  authenticator.bearer.push(
    createMachineBearerVerifier({
      machines,
      secrets,
      lastUsed,
      prefix: config.auth.tokens.machinePrefix,
      now: clock,
    }),
  );
  authenticator.basic.push(
    createMachineBasicVerifier({
      machines,
      secrets,
      lastUsed,
      iterations: config.auth.passwordIterations,
      upgrader: deps.passwords,
      now: clock,
    }),
  );
  authenticator.certificate.push(createMachineCertificateVerifier({ machines, lastUsed }));
  return authenticator;
}
