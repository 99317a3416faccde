import type { Clock } from "../clock.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type {
  CertificateBindingState,
  MachineAuthState,
  MachineCredentialState,
  MachineStateRepository,
} from "../storage/repositories/subject-state.js";
import type { BearerVerifier, CertificateVerifier, ClaimsLoader } from "./authenticator.js";
import { mayManage } from "./authority.js";
import { type Awaitable, andThen } from "./awaitable.js";
import {
  CERTIFICATE_TOKEN_CLAIMS,
  type CertificateIdentity,
  grantingCertificateOf,
} from "./certificate-token.js";
import type { AccessTokenClaims } from "./jwt.js";
import type { LastUsedTracker } from "./last-used.js";
import { type AuthMethod, type Principal, TENANT_DISABLED_MESSAGE, walledOff } from "./principal.js";
import { intersectScopes, parseScopeString } from "./scopes.js";
import type { VerifiedSecretCache } from "./secret-cache.js";
import { storedSecretVerifier } from "./stored-secret.js";
import { parseToken } from "./token-format.js";

/**
 * Every generated machine-user Basic username starts with this. Human usernames may not
 * (assertUsername refuses it), so the user Basic verifier hands such names straight to
 * the machine verifier: an unknown username costs exactly one dummy PBKDF2, never two.
 */
export const MACHINE_USERNAME_PREFIX = "mu_";

/** Tables whose `last_used_at` the tracker maintains for machine principals. */
export const MACHINE_USERS_TABLE = "machine_users" as const;
export const MACHINE_CREDENTIALS_TABLE = "machine_credentials" as const;

export type { MachineAuthState, MachineCredentialState } from "../storage/repositories/subject-state.js";

/**
 * The machine user a verified client certificate is bound to, decided among the bindings
 * that name it (its fingerprint, its SAN URIs). Null when it is bound to no one.
 *
 * A proven fingerprint binding (made over a connection presenting this very certificate,
 * see BindCertificate) names it, proven by the holder of its key, so it decides. Else all
 * the matching bindings (its fingerprint, any of its SAN URIs, proven or not) must be in
 * one tenant, or it authenticates no one until its owner proves the fingerprint (or the
 * squatted identity, which displaces the other tenant's unproven binding): a proven SAN URI
 * shows its maker holds *a* certificate carrying it, not this one. Nothing else could tell
 * the certificate's owner from another tenant that bound its public fingerprint or a
 * guessable SAN URI, and every rule that picks a winner between tenants (by kind, by age)
 * hands some certificate to the tenant that did not issue it. Within the tenant a
 * fingerprint binding wins over SAN URI bindings (see {@link overFingerprint}); of SAN URIs
 * naming different machine users, proven ones decide against those their binders may
 * manage ({@link overProven}), and among unproven ones only bindings whose binder may manage
 * every rival machine user count (see {@link contesting}); two that still do are refused
 * rather than guessed between.
 */
export function machineOfCertificate(
  machines: Pick<MachineStateRepository, "bindingsOf">,
  certificate: CertificateIdentity,
): Awaitable<{ bindingId: string; machine: MachineAuthState } | null> {
  return andThen(machines.bindingsOf(certificate.sha256Fingerprint, certificate.sanUris), (rows) =>
    ownerAmong(certificate, rows),
  );
}

/** {@link machineOfCertificate}'s decision among the bindings read. */
function ownerAmong(
  certificate: CertificateIdentity,
  rows: readonly CertificateBindingState[],
): { bindingId: string; machine: MachineAuthState } | null {
  if (rows.length === 0) return null;
  // Every binding of this certificate counts, a proven SAN URI's rivals too: it proves its
  // maker holds *a* certificate carrying that URI, not this one. Otherwise a CA that gave one
  // SAN URI to two tenants' certificates would hand one tenant's workload to the other.
  if (rows.some((r) => r.machine.tenantId !== rows[0]!.machine.tenantId)) {
    // A proven fingerprint binding settles it (the fingerprint is unique, so there is one).
    const provenFingerprint = rows.filter(
      (r) => r.proven && r.boundFingerprint === certificate.sha256Fingerprint,
    );
    if (provenFingerprint.length > 0) return pick(provenFingerprint);
    // AUTH_REQUIRED, not CREDENTIALS_INVALID: nothing was guessed, and a refusal that spent
    // the IP's failure budget would let the other tenant lock the owner's address out.
    // The message names no tenant.
    throw new TesseraError(
      "AUTH_REQUIRED",
      "client certificate is bound to more than one machine user; it authenticates no one",
    );
  }
  const byFingerprint = rows.find((r) => r.boundFingerprint === certificate.sha256Fingerprint);
  let chosen = byFingerprint ? overFingerprint(byFingerprint, rows) : rows;
  if (!oneMachine(chosen)) chosen = chosen.some((r) => r.proven) ? overProven(chosen) : contesting(chosen);
  if (!oneMachine(chosen)) {
    throw new TesseraError(
      "CREDENTIALS_INVALID",
      "client certificate is bound to more than one machine user",
    );
  }
  return pick(chosen);
}

/**
 * Among unproven SAN URI bindings naming different machine users, the ones that may contest
 * every rival: a binding stands against another machine user's only when its binder's
 * scopes at bind time cover that machine user's current scopes ({@link mayManage}, the rule
 * {@link overFingerprint} applies to a fingerprint binding), since binding one of a
 * certificate's SAN URIs to a machine user of one's own takes that certificate from the
 * others. Else a holder of admin:machine-users binds a second SAN URI of a stronger machine
 * user's certificate to a scopeless machine user and locks that certificate out. Binders
 * who may each manage the other's machine user still refuse the certificate (all stand),
 * as do binders who may manage neither (none stands).
 */
function contesting(bindings: readonly CertificateBindingState[]): readonly CertificateBindingState[] {
  return bindings.filter((b) => {
    const binder = { scopes: b.binderScopes };
    return bindings.every((r) => r.machine.id === b.machine.id || mayManage(binder, r.machine));
  });
}

/**
 * Of SAN URI bindings naming different machine users of one tenant, some proven: the proven
 * ones decide (among themselves by {@link contesting}) over an unproven binding of a machine
 * user one of their binders may manage ({@link mayManage}). An unproven binding they may not
 * manage keeps the certificate only if its own binder may manage theirs; where neither may,
 * it is refused, as between two unproven bindings. A proof shows its maker holds *a*
 * certificate carrying the URI, not this one, so it cannot take a certificate from a
 * stronger machine user; nor can a binding that proves nothing take it from the prover's.
 */
function overProven(bindings: readonly CertificateBindingState[]): readonly CertificateBindingState[] {
  let provers: readonly CertificateBindingState[] = bindings.filter((b) => b.proven);
  if (!oneMachine(provers)) provers = contesting(provers);
  if (!oneMachine(provers)) return provers;
  const prover = provers[0]!.machine;
  const rivals = bindings.filter(
    (r) =>
      !r.proven &&
      r.machine.id !== prover.id &&
      !provers.some((b) => mayManage({ scopes: b.binderScopes }, r.machine)),
  );
  if (rivals.length === 0) return provers;
  if (rivals.some((r) => !mayManage({ scopes: r.binderScopes }, prover))) return [];
  return oneMachine(rivals) ? rivals : contesting(rivals);
}

/** Whether `bindings` are some, all naming one machine user. */
function oneMachine(bindings: readonly CertificateBindingState[]): boolean {
  return bindings.length > 0 && bindings.every((r) => r.machine.id === bindings[0]!.machine.id);
}

/**
 * The bindings that decide when the certificate's fingerprint is bound (within one tenant).
 * A proven fingerprint binding decides: the holder of the key made it. An unproven one is a
 * claim on a public value, so it outranks a SAN URI binding of another machine user only
 * when its binder's scopes at bind time cover that machine user's current scopes (the one
 * authority rule, {@link mayManage}): taking a certificate from a machine user is managing
 * it. Else the SAN URI bindings it does not outrank decide (naming several machine users,
 * among themselves by {@link contesting}) when their binders may manage its machine user,
 * whichever binding came first: a holder of admin:machine-users that bound a certificate's
 * fingerprint before a stronger machine user's SAN URI binding was made cannot take that
 * certificate, and scopes granted later to the SAN URI-bound machine user count from the
 * next request on. Where neither binder may manage the other's machine user it is refused,
 * as between two SAN URI bindings: a SAN URI bind needs no authority over the certificate's
 * other machine users, so winning there would be a take-over by an unrelated admin.
 */
function overFingerprint(
  fingerprint: CertificateBindingState,
  candidates: readonly CertificateBindingState[],
): readonly CertificateBindingState[] {
  if (fingerprint.proven) return [fingerprint];
  const binder = { scopes: fingerprint.binderScopes };
  const standing = candidates.filter(
    (r) =>
      r.boundFingerprint === null && r.machine.id !== fingerprint.machine.id && !mayManage(binder, r.machine),
  );
  if (standing.length === 0) return [fingerprint];
  return standing.every((r) => mayManage({ scopes: r.binderScopes }, fingerprint.machine)) ? standing : [];
}

/** The first of bindings that all name one machine user. */
function pick(bindings: readonly CertificateBindingState[]): {
  bindingId: string;
  machine: MachineAuthState;
} {
  return { bindingId: bindings[0]!.bindingId, machine: bindings[0]!.machine };
}

/** Refuse a machine user that may not act now. */
export function assertMachineActive(machine: MachineAuthState | null): asserts machine is MachineAuthState {
  if (!machine) throw new TesseraError("TOKEN_REVOKED", "the credential's machine user no longer exists");
  if (machine.disabled) throw new TesseraError("PRINCIPAL_DISABLED", "machine user is disabled");
  if (machine.tenantDisabled) throw new TesseraError("PRINCIPAL_DISABLED", TENANT_DISABLED_MESSAGE);
}

/** The principal of a machine user authenticated by `method` (the Basic verifier's too, machine-basic.ts). */
export function machinePrincipal(
  machine: MachineAuthState,
  method: AuthMethod,
  state: RequestState,
  extra: Pick<
    Principal,
    "credentialId" | "expiresAt" | "issuedAt" | "certificateBinding" | "grantingCertificate"
  > & {
    scopes?: readonly string[];
  } = {},
): Principal {
  const principal: Principal = {
    kind: "machine",
    method,
    id: machine.id,
    tenantId: machine.tenantId,
    scopes: extra.scopes ?? machine.scopes,
    applicationIds: machine.applicationIds,
    certificate: state.certificate,
  };
  if (extra.credentialId) principal.credentialId = extra.credentialId;
  if (extra.expiresAt !== undefined) principal.expiresAt = extra.expiresAt;
  if (extra.issuedAt !== undefined) principal.issuedAt = extra.issuedAt;
  if (extra.certificateBinding !== undefined) principal.certificateBinding = extra.certificateBinding;
  if (extra.grantingCertificate !== undefined) principal.grantingCertificate = extra.grantingCertificate;
  return principal;
}

/** Shared dependencies of the machine verifiers. */
export interface MachineVerifierOptions {
  machines: MachineStateRepository;
  secrets: Pick<VerifiedSecretCache, "verify" | "knows">;
  lastUsed: Pick<LastUsedTracker, "mark">;
  /** The clock expiries are checked against (default: the machine's; tests pass a manual one). */
  now?: Clock;
}

/**
 * `Authorization: Bearer tsr_mu_…`. Cheapest check first, so nothing bad reaches PBKDF2:
 * prefix (not ours → null); length, alphabet and CRC32 (→ TOKEN_INVALID, no database);
 * one indexed look-up (unknown → TOKEN_INVALID); a credential rotated out past its grace
 * period → TOKEN_REVOKED; machine user or tenant disabled → PRINCIPAL_DISABLED (states
 * told apart only to a holder of the token's public id, as for personal access tokens);
 * then the secret through the verified-secret cache (PBKDF2 on first use only).
 */
export function createMachineBearerVerifier(
  options: MachineVerifierOptions & { prefix: string },
): BearerVerifier {
  const { machines, secrets, lastUsed, prefix } = options;
  const now = options.now ?? Date.now;
  /** The token's id and secret when it is one of ours (null: another verifier's). @throws TesseraError TOKEN_INVALID when malformed */
  function ours(token: string): { id: string; secret: string } | null {
    const parsed = parseToken(token, [prefix]);
    if (parsed === "malformed")
      throw new TesseraError("TOKEN_INVALID", "token is malformed (checksum or length mismatch)");
    return parsed;
  }
  /** Refuse a credential that may not authenticate now, before its secret is looked at. */
  function assertUsable(
    cred: MachineCredentialState | null,
    state: RequestState,
  ): asserts cred is MachineCredentialState {
    if (cred?.kind !== "bearer" || walledOff(state, cred.machine.tenantId))
      throw new TesseraError("TOKEN_INVALID", "token is not recognised");
    if (cred.expiresAt !== null && cred.expiresAt <= now()) {
      throw new TesseraError("TOKEN_REVOKED", "token was replaced by a credential rotation");
    }
    assertMachineActive(cred.machine);
  }
  function accepted(cred: MachineCredentialState, state: RequestState): Principal {
    lastUsed.mark(MACHINE_CREDENTIALS_TABLE, cred.credentialId);
    lastUsed.mark(MACHINE_USERS_TABLE, cred.machine.id);
    return machinePrincipal(cred.machine, "machine_token", state, {
      credentialId: cred.credentialId,
      expiresAt: cred.expiresAt,
    });
  }
  return storedSecretVerifier(secrets, machines, {
    name: "machine-token",
    ours,
    read: (presented) => machines.byCredential(presented.id),
    assertUsable,
    namespace: (cred) => `machine:${cred.credentialId}`,
    accepted,
    unknown: "token is not recognised",
  });
}

/**
 * mTLS with no header: the connection's verified client certificate (the TLS layer has
 * checked the chain and the CRL) is looked up among the bindings on every request. A
 * CA-signed certificate bound to no machine user authenticates nobody (null → the
 * interceptor answers AUTH_REQUIRED).
 */
export function createMachineCertificateVerifier(
  options: Pick<MachineVerifierOptions, "machines" | "lastUsed">,
): CertificateVerifier {
  const { machines, lastUsed } = options;
  return {
    name: "machine-mtls",
    async verify(certificate, state) {
      const found = await machineOfCertificate(machines, certificate);
      if (!found) return null;
      assertMachineActive(found.machine);
      lastUsed.mark(MACHINE_USERS_TABLE, found.machine.id);
      return machinePrincipal(found.machine, "mtls", state, { credentialId: found.bindingId });
    },
  };
}

/**
 * Loader for machine access tokens (IssueAccessToken): the machine user must still exist
 * in the token's tenant and be enabled (with its tenant); the token's scopes are cut to
 * what it holds now; and a token issued before the last credential rotation stops when
 * the previous credentials do (tokens issued by a credential in its grace period never
 * outlive it: IssueAccessToken caps their lifetime); one issued to a certificate alone
 * holds while that certificate authenticates as its machine user.
 */
export function createMachineClaimsLoader(
  machines: MachineStateRepository,
  now: Clock = Date.now,
): ClaimsLoader {
  return (claims, state) =>
    claims[CERTIFICATE_TOKEN_CLAIMS.amr] === undefined
      ? andThen(machines.byId(claims.sub), (row) => principalOf(claims, state, row))
      : marked(claims, state);

  /**
   * A token with `amr`: one issued to a certificate alone had that certificate's binding for
   * authority, so it holds only while the certificate (its fingerprint and SAN URIs) still
   * authenticates as its subject. The bindings read carry the machine user's state: one read.
   */
  function marked(claims: AccessTokenClaims, state: RequestState): Awaitable<Principal> {
    const certificate = grantingCertificateOf(claims);
    if (certificate === null)
      return andThen(machines.byId(claims.sub), (row) => principalOf(claims, state, row));
    return andThen(machines.bindingsOf(certificate.sha256Fingerprint, certificate.sanUris), (rows) =>
      principalOf(claims, state, ownerNamed(certificate, rows, claims.sub), certificate),
    );
  }

  function principalOf(
    claims: AccessTokenClaims,
    state: RequestState,
    machine: MachineAuthState | null,
    grantingCertificate?: CertificateIdentity,
  ): Principal {
    assertMachineActive(machine);
    if (machine.tenantId !== claims.tid)
      throw new TesseraError("TOKEN_INVALID", "token tenant does not match its machine user");
    // A cut-off a later rotation replaced stays in force (recordRotation): over for good.
    if (
      machine.tokensRevokedBefore !== null &&
      typeof claims.iat === "number" &&
      claims.iat <= Math.floor(machine.tokensRevokedBefore / 1000)
    )
      throw new TesseraError("TOKEN_REVOKED", "token predates a credential rotation");
    // iat has one-second resolution: a token from the rotation's own second counts as older
    // (fail closed); IssueAccessToken never issues in that second (see rotationSecondPassed).
    let expiresAt = claims.exp * 1000;
    if (
      machine.rotatedAt !== null &&
      typeof claims.iat === "number" &&
      claims.iat <= Math.floor(machine.rotatedAt / 1000)
    ) {
      const cutoff = machine.rotationGraceUntil ?? machine.rotatedAt;
      if (now() >= cutoff) throw new TesseraError("TOKEN_REVOKED", "token predates a credential rotation");
      // It ends with the grace period, which no event announces: what is told of its end (a
      // VerifyCredential answer a downstream service caches, a WatchRevocations stream's
      // deadline, introspection's exp) must say so, not the later `exp`.
      expiresAt = Math.min(expiresAt, cutoff);
    }
    const extra: Parameters<typeof machinePrincipal>[3] = {
      scopes: intersectScopes(parseScopeString(claims.scope), machine.scopes),
      expiresAt,
    };
    if (typeof claims.iat === "number") extra.issuedAt = claims.iat * 1000;
    if (claims.cnf?.["x5t#S256"] !== undefined) extra.certificateBinding = claims.cnf["x5t#S256"];
    if (claims.jti) extra.credentialId = claims.jti;
    if (grantingCertificate !== undefined) extra.grantingCertificate = grantingCertificate;
    return machinePrincipal(machine, "jwt", state, extra);
  }
}

/**
 * The machine user `certificate` authenticates as among `rows` (its bindings) when that is
 * `subject`; else (another, no one, the rule's refusals) its token as `subject` is over.
 */
function ownerNamed(
  certificate: CertificateIdentity,
  rows: readonly CertificateBindingState[],
  subject: string,
): MachineAuthState {
  let owner: ReturnType<typeof ownerAmong> = null;
  try {
    owner = ownerAmong(certificate, rows);
  } catch (err) {
    if (!(err instanceof TesseraError)) throw err;
  }
  if (owner?.machine.id === subject) return owner.machine;
  throw new TesseraError(
    "TOKEN_REVOKED",
    "the certificate the token was issued to no longer authenticates as its machine user",
  );
}
