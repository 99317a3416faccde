import type { Clock } from "../clock.js";
import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { SqlRunner } from "../storage/sql.js";
import { toBool, toMillis } from "../storage/sql.js";
import type { BasicVerifier, BearerVerifier, CertificateVerifier, ClaimsLoader } from "./authenticator.js";
import type { LastUsedTracker } from "./last-used.js";
import { dummyPasswordHash, verifySecret } from "./password.js";
import type { AuthMethod, PeerCertificateInfo, Principal } from "./principal.js";
import { intersectScopes, parseScopeString } from "./scopes.js";
import type { SharedDigest, VerifiedSecretCache } from "./secret-cache.js";
import { parseToken } from "./token-format.js";

/**
 * Every generated machine-user Basic username starts with this. Human usernames may not
 * (assertUsername refuses it), so the user Basic verifier hands such names straight to
 * the machine verifier: an unknown username costs exactly one dummy PBKDF2, never two.
 */
export const MACHINE_USERNAME_PREFIX = "mu_";

/** Tables whose `last_used_at` the tracker maintains for machine principals. */
export const MACHINE_USERS_TABLE = "machine_users";
export const MACHINE_CREDENTIALS_TABLE = "machine_credentials";

/** A machine user's current state as the authentication path needs it. */
export interface MachineAuthState {
  id: string;
  tenantId: string;
  name: string;
  scopes: string[];
  disabled: boolean;
  tenantDisabled: boolean;
  applicationIds: string[];
  /** Epoch ms of the last credential rotation, or null. */
  rotatedAt: number | null;
  /** Epoch ms at which the pre-rotation credentials stopped (or stop) working, or null. */
  rotationGraceUntil: number | null;
}

/** A credential row joined with its machine user. */
export interface MachineCredentialState {
  credentialId: string;
  kind: string;
  secretHash: string;
  /** The shared digest of the secret, once some instance verified it (see VerifiedSecretCache). */
  verifiedDigest: string | null;
  expiresAt: number | null;
  machine: MachineAuthState;
}

interface MachineRow {
  id: string;
  tenant_id: string;
  name: string;
  scopes: string;
  disabled: unknown;
  tenant_disabled: unknown;
  rotated_at: unknown;
  rotation_grace_until: unknown;
  application_id: string | null;
}

interface CredentialRow extends MachineRow {
  credential_id: string;
  kind: string;
  secret_hash: string;
  verified_digest: string | null;
  expires_at: unknown;
}

interface BindingRow extends MachineRow {
  binding_id: string;
  bound_fingerprint: string | null;
  proven: unknown;
}

const MACHINE_COLUMNS =
  "m.id, m.tenant_id, m.name, m.scopes, m.disabled, m.rotated_at, m.rotation_grace_until, " +
  "t.disabled as tenant_disabled, a.application_id";
const MACHINE_JOINS =
  "join tenants t on t.id = m.tenant_id left join machine_user_applications a on a.machine_user_id = m.id";

/** One round trip: the credential, its machine user, the tenant and the assignments (one row per application). */
const SELECT_BY_CREDENTIAL =
  `select c.id as credential_id, c.kind, c.secret_hash, c.verified_digest, c.expires_at, ${MACHINE_COLUMNS} ` +
  `from machine_credentials c join machine_users m on m.id = c.machine_user_id ${MACHINE_JOINS} where c.public_id = ?`;

/** The stored digest read past the state cache (see SharedDigest.fresh). */
const SELECT_DIGEST = "select verified_digest from machine_credentials where id = ?";
/** Bound to the hash it was computed with: a digest for a hash replaced meanwhile is not stored. */
const STORE_DIGEST = "update machine_credentials set verified_digest = ? where id = ? and secret_hash = ?";

const SELECT_BY_ID = `select ${MACHINE_COLUMNS} from machine_users m ${MACHINE_JOINS} where m.id = ?`;

function bindingQuery(sanCount: number): string {
  const sans = sanCount > 0 ? ` or b.san_uri in (${new Array(sanCount).fill("?").join(", ")})` : "";
  return (
    `select b.id as binding_id, b.sha256_fingerprint as bound_fingerprint, b.proven, ${MACHINE_COLUMNS} ` +
    `from machine_user_certificates b join machine_users m on m.id = b.machine_user_id ${MACHINE_JOINS} ` +
    `where b.sha256_fingerprint = ?${sans}`
  );
}

/** States folded from cached row lists (the state cache hands out the same frozen list until it changes). */
const folded = new WeakMap<readonly MachineRow[], MachineAuthState>();

/** Credentials folded from cached row lists: one object per list, so that learnt digests stick to it. */
const credentials = new WeakMap<readonly CredentialRow[], MachineCredentialState>();

function toCredential(rows: readonly CredentialRow[]): MachineCredentialState | null {
  if (rows.length === 0) return null;
  let cred = credentials.get(rows);
  if (cred === undefined) {
    cred = foldCredential(rows);
    credentials.set(rows, cred);
  }
  return cred;
}

/**
 * Digests stored or read after a credential's rows were (see the same in token-verifier.ts):
 * storing one empties no state cache, so the rows a cache keeps may predate it.
 */
const learntDigests = new WeakMap<MachineCredentialState, string>();

function foldCredential(rows: readonly CredentialRow[]): MachineCredentialState {
  const first = rows[0]!;
  return {
    credentialId: first.credential_id,
    kind: first.kind,
    secretHash: first.secret_hash,
    verifiedDigest: first.verified_digest,
    expiresAt: toMillis(first.expires_at),
    machine: toMachine(rows),
  };
}

/** Fold the rows of one machine user (one per assigned application) into its state. */
function toMachine(rows: readonly MachineRow[]): MachineAuthState {
  let state = folded.get(rows);
  if (state === undefined) {
    state = fold(rows);
    folded.set(rows, state);
  }
  return state;
}

function fold(rows: readonly MachineRow[]): MachineAuthState {
  const first = rows[0]!;
  const applicationIds: string[] = [];
  for (const r of rows) if (r.application_id) applicationIds.push(r.application_id);
  // Frozen: every request authenticated by the same cached rows shares it.
  return Object.freeze({
    id: first.id,
    tenantId: first.tenant_id,
    name: first.name,
    scopes: Object.freeze(parseScopeString(first.scopes)) as string[],
    disabled: toBool(first.disabled),
    tenantDisabled: toBool(first.tenant_disabled),
    applicationIds: Object.freeze(applicationIds) as string[],
    rotatedAt: toMillis(first.rotated_at),
    rotationGraceUntil: toMillis(first.rotation_grace_until),
  });
}

/**
 * Reads machine-user state with raw prepared statements (no ORM on the hot path): one
 * indexed look-up, or the state cache that every change empties first (SqlRunner.cachedAll),
 * so disabling, deletion, rotation and re-assignment apply on the very next request.
 */
export class MachineStateReader {
  constructor(private readonly sql: SqlRunner) {}

  /** The credential whose public id (token id or Basic username) is `publicId`. */
  async byCredential(publicId: string): Promise<MachineCredentialState | null> {
    return toCredential(await this.sql.cachedAll<CredentialRow>(SELECT_BY_CREDENTIAL, [publicId]));
  }

  /** The shared digest of a credential's secret (generated, high-entropy: see VerifiedSecretCache). */
  sharedDigest(cred: MachineCredentialState): SharedDigest {
    const sql = this.sql;
    return {
      stored: this.digestOf(cred),
      fresh: async () => {
        const found = (await sql.get<{ verified_digest: string | null }>(SELECT_DIGEST, [cred.credentialId]))
          ?.verified_digest;
        if (found) learntDigests.set(cred, found);
        return found ?? null;
      },
      save: async (digest) => {
        await sql.run(STORE_DIGEST, [digest, cred.credentialId, cred.secretHash]);
        learntDigests.set(cred, digest);
      },
    };
  }

  /** The digest known for a credential read. */
  digestOf(cred: MachineCredentialState): string | null {
    return learntDigests.get(cred) ?? cred.verifiedDigest;
  }

  /**
   * {@link byCredential} answered synchronously where the store allows it (SQLite, see
   * `SqlRunner.sync`); undefined where it does not.
   */
  byCredentialNow(publicId: string): MachineCredentialState | null | undefined {
    const sync = this.sql.sync;
    return sync === undefined
      ? undefined
      : toCredential(sync.cachedAll<CredentialRow>(SELECT_BY_CREDENTIAL, [publicId]));
  }

  async byId(id: string): Promise<MachineAuthState | null> {
    const rows = await this.sql.cachedAll<MachineRow>(SELECT_BY_ID, [id]);
    return rows.length === 0 ? null : toMachine(rows);
  }

  /**
   * The machine user a verified client certificate is bound to. Null when it is bound to no one.
   *
   * Proven bindings first (made over a connection presenting the certificate itself, see
   * BindCertificate): a proven fingerprint binding names this very certificate, proven by
   * the holder of its key, so it decides; else proven SAN URI bindings decide when they
   * name one machine user (the CA issued the SAN URI to the prover), unless another
   * tenant bound this certificate's own fingerprint (unproven): then it authenticates no
   * one until the fingerprint is proven (which displaces the other tenant's binding).
   * Another tenant's unproven binding of a SAN URI the certificate carries cannot deny the
   * prover its own certificate.
   *
   * With no proven binding, all the matching bindings (its fingerprint, any of its SAN
   * URIs) must be in one tenant, or it authenticates no one: nothing at bind time could tell
   * the certificate's owner from another tenant that bound its public fingerprint or a
   * guessable SAN URI, and every rule that picks a winner between tenants (by kind, by age)
   * hands some certificate to the tenant that did not issue it. Within the tenant a
   * fingerprint binding wins over SAN URI bindings; SAN URIs naming two different machine
   * users are refused rather than guessed between.
   */
  async byCertificate(
    certificate: PeerCertificateInfo,
  ): Promise<{ bindingId: string; machine: MachineAuthState } | null> {
    const sans = certificate.sanUris.slice(0, 16);
    const rows = await this.sql.cachedAll<BindingRow>(bindingQuery(sans.length), [
      certificate.sha256Fingerprint,
      ...sans,
    ]);
    if (rows.length === 0) return null;
    const proven = rows.filter((r) => toBool(r.proven));
    // A proven SAN URI binding proves its maker holds *a* certificate carrying that URI, not
    // this one: an unproven binding of this very certificate's fingerprint stays a claim
    // beside it, so two tenants' claims still authenticate no one (the fingerprint's owner
    // settles it by proving the fingerprint). Otherwise a CA that gave one SAN URI to two
    // tenants' certificates would hand one tenant's workload to the other.
    const candidates =
      proven.length > 0
        ? [
            ...proven,
            ...rows.filter((r) => !toBool(r.proven) && r.bound_fingerprint === certificate.sha256Fingerprint),
          ]
        : rows;
    if (candidates.some((r) => r.tenant_id !== candidates[0]!.tenant_id)) {
      // A proven fingerprint binding settles it (the fingerprint is unique, so there is one).
      const provenFingerprint = proven.filter((r) => r.bound_fingerprint === certificate.sha256Fingerprint);
      if (provenFingerprint.length > 0) return pick(provenFingerprint);
      // AUTH_REQUIRED, not CREDENTIALS_INVALID: nothing was guessed, and a refusal that spent
      // the IP's failure budget would let the other tenant lock the owner's address out.
      // The message names no tenant.
      throw new TesseraError(
        "AUTH_REQUIRED",
        "client certificate is bound to more than one machine user; it authenticates no one",
      );
    }
    const byFingerprint = candidates.filter((r) => r.bound_fingerprint === certificate.sha256Fingerprint);
    const chosen = byFingerprint.length > 0 ? byFingerprint : candidates;
    const machineIds = new Set(chosen.map((r) => r.id));
    if (machineIds.size > 1) {
      throw new TesseraError(
        "CREDENTIALS_INVALID",
        "client certificate is bound to more than one machine user",
      );
    }
    return pick(chosen);
  }
}

/** The binding and machine user of rows that all name one machine user (one row per application). */
function pick(rows: BindingRow[]): { bindingId: string; machine: MachineAuthState } {
  return { bindingId: rows[0]!.binding_id, machine: toMachine(rows) };
}

/** Refuse a machine user that may not act now. */
export function assertMachineActive(machine: MachineAuthState | null): asserts machine is MachineAuthState {
  if (!machine) throw new TesseraError("TOKEN_REVOKED", "the credential's machine user no longer exists");
  if (machine.disabled) throw new TesseraError("PRINCIPAL_DISABLED", "machine user is disabled");
  if (machine.tenantDisabled) throw new TesseraError("PRINCIPAL_DISABLED", "tenant is disabled");
}

function machinePrincipal(
  machine: MachineAuthState,
  method: AuthMethod,
  state: RequestState,
  extra: { scopes?: readonly string[]; credentialId?: string } = {},
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
  return principal;
}

/** Shared dependencies of the machine verifiers. */
export interface MachineVerifierOptions {
  machines: MachineStateReader;
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
  function assertUsable(cred: MachineCredentialState | null): asserts cred is MachineCredentialState {
    if (cred?.kind !== "bearer") throw new TesseraError("TOKEN_INVALID", "token is not recognised");
    if (cred.expiresAt !== null && cred.expiresAt <= now()) {
      throw new TesseraError("TOKEN_REVOKED", "token was replaced by a credential rotation");
    }
    assertMachineActive(cred.machine);
  }
  function accepted(cred: MachineCredentialState, state: RequestState): Principal {
    lastUsed.mark(MACHINE_CREDENTIALS_TABLE, cred.credentialId);
    lastUsed.mark(MACHINE_USERS_TABLE, cred.machine.id);
    return machinePrincipal(cred.machine, "machine_token", state, { credentialId: cred.credentialId });
  }
  return {
    name: "machine-token",
    // `verify` without a promise, for a token whose secret the cache knows and whose rows are
    // read synchronously (SQLite): admission then needs no no-hashing scope for it.
    verifyNow(token, state) {
      const presented = ours(token);
      if (presented === null) return null;
      const cred = machines.byCredentialNow(presented.id);
      if (cred === undefined) return undefined;
      assertUsable(cred);
      if (
        !secrets.knows(
          `machine:${cred.credentialId}`,
          presented.secret,
          cred.secretHash,
          machines.digestOf(cred),
        )
      )
        return undefined;
      return accepted(cred, state);
    },
    async verify(token, state) {
      const presented = ours(token);
      if (presented === null) return null;
      const cred = await machines.byCredential(presented.id);
      assertUsable(cred);
      if (
        !(await secrets.verify(
          `machine:${cred.credentialId}`,
          presented.secret,
          cred.secretHash,
          machines.sharedDigest(cred),
        ))
      ) {
        throw new TesseraError("TOKEN_INVALID", "token is not recognised");
      }
      return accepted(cred, state);
    },
  };
}

/**
 * `Authorization: Basic` for machine users (usernames starting with
 * {@link MACHINE_USERNAME_PREFIX}; anything else → null, left to the user verifier).
 * The password is checked first (an unknown username costs one dummy PBKDF2, so timing
 * does not tell which exist), through the verified-secret cache: after first use a
 * request costs an HMAC, not PBKDF2. Wrong passwords are 401s, which the authentication
 * interceptor counts per IP, refusing the IP before any verification once over
 * `rateLimit.authFailuresPerIpPerMinute`.
 */
export function createMachineBasicVerifier(
  options: MachineVerifierOptions & { iterations: number },
): BasicVerifier {
  const { machines, secrets, lastUsed } = options;
  const now = options.now ?? Date.now;
  return {
    name: "machine-basic",
    async verify(username, password, state) {
      if (!username.startsWith(MACHINE_USERNAME_PREFIX)) return null;
      const cred = await machines.byCredential(username);
      if (cred?.kind !== "basic") {
        await verifySecret(password, await dummyPasswordHash(options.iterations));
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      if (cred.machine.disabled || cred.machine.tenantDisabled) {
        // A disabled machine user's correct password reads exactly like a wrong one, with
        // the same full PBKDF2 each time (no verified-secret cache: no timing difference).
        await verifySecret(password, cred.secretHash);
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      if (
        !(await secrets.verify(
          `machine:${cred.credentialId}`,
          password,
          cred.secretHash,
          machines.sharedDigest(cred),
        ))
      ) {
        throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
      }
      if (cred.expiresAt !== null && cred.expiresAt <= now()) {
        throw new TesseraError("TOKEN_REVOKED", "credentials were replaced by a credential rotation");
      }
      assertMachineActive(cred.machine);
      lastUsed.mark(MACHINE_CREDENTIALS_TABLE, cred.credentialId);
      lastUsed.mark(MACHINE_USERS_TABLE, cred.machine.id);
      return machinePrincipal(cred.machine, "basic", state, { credentialId: cred.credentialId });
    },
  };
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
      const found = await machines.byCertificate(certificate);
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
 * outlive it: IssueAccessToken caps their lifetime).
 */
export function createMachineClaimsLoader(machines: MachineStateReader, now: Clock = Date.now): ClaimsLoader {
  return async (claims, state) => {
    const machine = await machines.byId(claims.sub);
    assertMachineActive(machine);
    if (machine.tenantId !== claims.tid)
      throw new TesseraError("TOKEN_INVALID", "token tenant does not match its machine user");
    // iat has one-second resolution: a token from the rotation's own second counts as older
    // (fail closed); IssueAccessToken never issues in that second (see rotationSecondPassed).
    if (
      machine.rotatedAt !== null &&
      typeof claims.iat === "number" &&
      claims.iat <= Math.floor(machine.rotatedAt / 1000)
    ) {
      const cutoff = machine.rotationGraceUntil ?? machine.rotatedAt;
      if (now() >= cutoff) throw new TesseraError("TOKEN_REVOKED", "token predates a credential rotation");
    }
    const extra: { scopes: string[]; credentialId?: string } = {
      scopes: intersectScopes(parseScopeString(claims.scope), machine.scopes),
    };
    if (claims.jti) extra.credentialId = claims.jti;
    return machinePrincipal(machine, "jwt", state, extra);
  };
}
