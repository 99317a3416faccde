import { type Awaitable, andThen } from "../../auth/awaitable.js";
import type { SharedDigest } from "../../auth/secret-cache.js";
import { DEFAULT_TENANT_NAME } from "../../bootstrap.js";
import { oncePerRow } from "../row-cache.js";
import { type SqlRunner, toBool, toMillis, toScopes } from "../sql.js";
import { digestOf, sharedDigest } from "./shared-digests.js";

/**
 * The state of subjects (users, machine users, their tenants and sessions) as the
 * authentication path reads it on every request: prepared statements through the
 * {@link SqlRunner}'s state cache (SQLite) or its LISTEN/NOTIFY-invalidated cache
 * (PostgreSQL), so every change applies on the very next request. The statements are
 * constants: both caches key their entries by statement text and parameters.
 */

/** A user's current state as the authentication path needs it. */
export interface UserAuthState {
  id: string;
  username: string;
  tenantId: string;
  scopes: string[];
  disabled: boolean;
  tenantDisabled: boolean;
  passwordHash: string;
  createdAt: number;
  /**
   * Read with a session ({@link UserStateRepository.bySession}): whether that session has
   * been revoked. Always false for a row read without one.
   */
  sessionRevoked: boolean;
  /**
   * Read with a session: its row's `created_at` as the database returned it, the start the
   * session's absolute end is counted from (see auth/session-end.ts); read it with
   * {@link sessionStartOf}. Left unparsed: only an instance with a bound needs it, once per row.
   */
  sessionCreatedAt: unknown;
}

/** When `user`'s session began (epoch ms), for a row read with one; null otherwise. */
export function sessionStartOf(user: UserAuthState): number | null {
  return toMillis(user.sessionCreatedAt);
}

interface UserRow {
  id: string;
  username: string;
  tenant_id: string;
  scopes: string;
  disabled: unknown;
  tenant_disabled: unknown;
  password_hash: string;
  created_at: unknown;
  /** Present only in rows read with a session. */
  session_revoked_at?: unknown;
  session_created_at?: unknown;
}

const SELECT_USER =
  "select u.id, u.username, u.tenant_id, u.scopes, u.disabled, u.password_hash, u.created_at, t.disabled as tenant_disabled " +
  "from users u join tenants t on t.id = u.tenant_id where ";
const USER_BY_ID = `${SELECT_USER}u.id = ?`;
/**
 * Usernames are unique per tenant. Without a tenant: the default tenant's user of that
 * name, else the one user of that name from the time usernames were global
 * (`tenantless_login`, at most one per name). Never "the oldest of any tenant": a tenant
 * admin could then create a name in its own tenant and learn, from whether a tenant-less
 * login with the password it chose works, whether another tenant holds the name. Here no
 * tenant admin can change what a tenant-less name means for a user it created (outside
 * the default tenant it never means that user; in it, always), so nothing is learnt.
 */
const USER_BY_USERNAME =
  `${SELECT_USER}u.username = ? and (t.name = ? or u.tenantless_login = ?) ` +
  "order by case when t.name = ? then 0 else 1 end, u.created_at, u.id limit 1";
const USER_BY_TENANT_ID_USERNAME = `${SELECT_USER}u.tenant_id = ? and u.username = ?`;
const USER_BY_TENANT_NAME_USERNAME = `${SELECT_USER}t.name = ? and u.username = ?`;
/**
 * The user's state and its session's, in one statement (one indexed look-up each, one
 * state-cache entry per session): checking the session costs the hot path nothing more
 * than the user's row did. An inner join: an unknown session reads as no row at all,
 * which the state cache never keeps (so inserting a session need not empty the cache,
 * see STATE_TABLES).
 */
const USER_BY_SESSION =
  "select u.id, u.username, u.tenant_id, u.scopes, u.disabled, u.password_hash, u.created_at, " +
  "t.disabled as tenant_disabled, s.revoked_at as session_revoked_at, s.created_at as session_created_at " +
  "from users u join tenants t on t.id = u.tenant_id join sessions s on s.user_id = u.id " +
  "where u.id = ? and s.id = ?";

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * Whether a string that names a tenant (Login's `tenant`, HTTP Basic's `<tenant>/`) is its
 * id: a value shaped like an id is taken as one, anything else as a tenant name.
 */
export function isTenantId(value: string): boolean {
  return UUID_RE.test(value);
}

/** A user row's state, frozen: every request authenticated by the same cached row shares it. */
const userState = oncePerRow(
  (row: UserRow): UserAuthState => ({
    id: row.id,
    username: row.username,
    tenantId: row.tenant_id,
    scopes: toScopes(row.scopes),
    disabled: toBool(row.disabled),
    tenantDisabled: toBool(row.tenant_disabled),
    passwordHash: row.password_hash,
    createdAt: toMillis(row.created_at) ?? 0,
    sessionRevoked: row.session_revoked_at !== undefined && row.session_revoked_at !== null,
    sessionCreatedAt: row.session_created_at ?? null,
  }),
);

const REPLACE_PASSWORD_HASH = "update users set password_hash = ? where id = ? and password_hash = ?";

function toUser(row: UserRow | undefined): UserAuthState | null {
  return row ? userState(row) : null;
}

/** User state reads: one indexed look-up each, or the state cache (SqlRunner.cachedGet). */
export class UserStateRepository {
  constructor(private readonly sql: SqlRunner) {}

  /** The user `id`; synchronously when the state cache answers (see SqlRunner.cachedGet). */
  byId(id: string): Awaitable<UserAuthState | null> {
    return andThen(this.sql.cachedGet<UserRow>(USER_BY_ID, [id]), toUser);
  }

  /** The user `id` with the state of its session `sid`; null when either does not exist. */
  bySession(id: string, sid: string): Awaitable<UserAuthState | null> {
    return andThen(this.sql.cachedGet<UserRow>(USER_BY_SESSION, [id, sid]), toUser);
  }

  /** The user a username alone names (see {@link USER_BY_USERNAME}). */
  async byUsername(username: string): Promise<UserAuthState | null> {
    return toUser(
      await this.sql.cachedGet<UserRow>(USER_BY_USERNAME, [
        username,
        DEFAULT_TENANT_NAME,
        true,
        DEFAULT_TENANT_NAME,
      ]),
    );
  }

  /** The user named `username` in `tenant` (its id, see {@link isTenantId}, or else its name). */
  async byTenantUsername(tenant: string, username: string): Promise<UserAuthState | null> {
    const sql = isTenantId(tenant) ? USER_BY_TENANT_ID_USERNAME : USER_BY_TENANT_NAME_USERNAME;
    return toUser(await this.sql.cachedGet<UserRow>(sql, [tenant, username]));
  }

  /**
   * Replace the user's password hash `from` by `to` (a re-hash of the same password:
   * auth/password-upgrade.ts); false when the hash is no longer `from` (changed meanwhile).
   */
  async replacePasswordHash(id: string, from: string, to: string): Promise<boolean> {
    return (await this.sql.run(REPLACE_PASSWORD_HASH, [to, id, from])) > 0;
  }
}

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
  /** Epoch ms up to which (by `iat`'s second) its access tokens are refused for good, or null. */
  tokensRevokedBefore: number | null;
}

/** A machine credential (token or Basic password) joined with its machine user. */
export interface MachineCredentialState {
  credentialId: string;
  kind: string;
  secretHash: string;
  /** The shared digest of the secret, once some instance verified it (see VerifiedSecretCache). */
  verifiedDigest: string | null;
  expiresAt: number | null;
  machine: MachineAuthState;
}

/** A certificate binding that matched a client certificate, with its machine user. */
export interface CertificateBindingState {
  bindingId: string;
  /** The bound SHA-256 fingerprint, or null for a SAN URI binding. */
  boundFingerprint: string | null;
  /** Made over a connection presenting the certificate itself (BindCertificate). */
  proven: boolean;
  /** The binder's effective scopes at bind time (none when not recorded: bound before they were). */
  binderScopes: readonly string[];
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
  tokens_revoked_before: unknown;
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
  binder_scopes: string | null;
}

const MACHINE_COLUMNS =
  "m.id, m.tenant_id, m.name, m.scopes, m.disabled, m.rotated_at, m.rotation_grace_until, " +
  "m.tokens_revoked_before, t.disabled as tenant_disabled, a.application_id";
const MACHINE_JOINS =
  "join tenants t on t.id = m.tenant_id left join machine_user_applications a on a.machine_user_id = m.id";

/** One round trip: the credential, its machine user, the tenant and the assignments (one row per application). */
const MACHINE_BY_CREDENTIAL =
  `select c.id as credential_id, c.kind, c.secret_hash, c.verified_digest, c.expires_at, ${MACHINE_COLUMNS} ` +
  `from machine_credentials c join machine_users m on m.id = c.machine_user_id ${MACHINE_JOINS} where c.public_id = ?`;

const REPLACE_SECRET_HASH =
  "update machine_credentials set secret_hash = ?, verified_digest = ? where id = ? and secret_hash = ?";

const MACHINE_BY_ID = `select ${MACHINE_COLUMNS} from machine_users m ${MACHINE_JOINS} where m.id = ?`;

/** At most this many SAN URIs of a certificate are looked up (one statement per count), and kept in its tokens. */
export const MAX_SAN_URIS = 16;

function bindingQuery(sanCount: number): string {
  const sans = sanCount > 0 ? ` or b.san_uri in (${new Array(sanCount).fill("?").join(", ")})` : "";
  return (
    `select b.id as binding_id, b.sha256_fingerprint as bound_fingerprint, b.proven, b.binder_scopes, ${MACHINE_COLUMNS} ` +
    `from machine_user_certificates b join machine_users m on m.id = b.machine_user_id ${MACHINE_JOINS} ` +
    `where b.sha256_fingerprint = ?${sans}`
  );
}
const BINDING_QUERIES = Array.from({ length: MAX_SAN_URIS + 1 }, (_, n) => bindingQuery(n));

/** Fold the rows of one machine user (one per assigned application) into its state, frozen. */
const toMachine = oncePerRow((rows: readonly MachineRow[]): MachineAuthState => {
  const first = rows[0]!;
  const applicationIds: string[] = [];
  for (const r of rows) if (r.application_id) applicationIds.push(r.application_id);
  return {
    id: first.id,
    tenantId: first.tenant_id,
    name: first.name,
    scopes: toScopes(first.scopes),
    disabled: toBool(first.disabled),
    tenantDisabled: toBool(first.tenant_disabled),
    applicationIds: Object.freeze(applicationIds) as string[],
    rotatedAt: toMillis(first.rotated_at),
    rotationGraceUntil: toMillis(first.rotation_grace_until),
    tokensRevokedBefore: toMillis(first.tokens_revoked_before),
  };
});

const credentialState = oncePerRow(
  (rows: readonly CredentialRow[]): MachineCredentialState => ({
    credentialId: rows[0]!.credential_id,
    kind: rows[0]!.kind,
    secretHash: rows[0]!.secret_hash,
    verifiedDigest: rows[0]!.verified_digest,
    expiresAt: toMillis(rows[0]!.expires_at),
    machine: toMachine(rows),
  }),
);

function toMachineOrNull(rows: readonly MachineRow[]): MachineAuthState | null {
  return rows.length === 0 ? null : toMachine(rows);
}

function toCredential(rows: readonly CredentialRow[]): MachineCredentialState | null {
  return rows.length === 0 ? null : credentialState(rows);
}

/** One state per binding (its rows: one per application of its machine user), in the order read. */
const toBindings = oncePerRow((rows: readonly BindingRow[]): readonly CertificateBindingState[] => {
  const rowsOf = new Map<string, BindingRow[]>();
  for (const r of rows) {
    const group = rowsOf.get(r.binding_id);
    if (group) group.push(r);
    else rowsOf.set(r.binding_id, [r]);
  }
  return [...rowsOf.values()].map((group) =>
    Object.freeze({
      bindingId: group[0]!.binding_id,
      boundFingerprint: group[0]!.bound_fingerprint,
      proven: toBool(group[0]!.proven),
      binderScopes: toScopes(group[0]!.binder_scopes ?? ""),
      machine: toMachine(group),
    }),
  );
});

/**
 * Machine-user state reads (no ORM on the hot path): one indexed look-up, or the state
 * cache that every change empties first (SqlRunner.cachedAll), so disabling, deletion,
 * rotation and re-assignment apply on the very next request.
 */
export class MachineStateRepository {
  constructor(private readonly sql: SqlRunner) {}

  /** The machine user `id`; synchronously when the state cache answers (see SqlRunner.cachedAll). */
  byId(id: string): Awaitable<MachineAuthState | null> {
    return andThen(this.sql.cachedAll<MachineRow>(MACHINE_BY_ID, [id]), toMachineOrNull);
  }

  /** The credential whose public id (token id or Basic username) is `publicId`. */
  byCredential(publicId: string): Awaitable<MachineCredentialState | null> {
    return andThen(this.sql.cachedAll<CredentialRow>(MACHINE_BY_CREDENTIAL, [publicId]), toCredential);
  }

  /** The shared digest of a credential's secret (generated, high-entropy: see VerifiedSecretCache). */
  sharedDigest(cred: MachineCredentialState): SharedDigest {
    return sharedDigest(this.sql, "machine_credentials", cred.credentialId, cred);
  }

  /** The digest known for a credential read. */
  digestOf(cred: MachineCredentialState): string | null {
    return digestOf(cred);
  }

  /**
   * Replace credential `id`'s secret hash `from` by `to` (a re-hash of the same secret:
   * auth/password-upgrade.ts) with `digest`, the shared digest bound to `to` (null: none);
   * false when the hash is no longer `from` (the row rotated away or replaced meanwhile).
   * Nothing else of the row is written: an expiry a rotation set meanwhile stands.
   */
  async replaceSecretHash(id: string, from: string, to: string, digest: string | null): Promise<boolean> {
    return (await this.sql.run(REPLACE_SECRET_HASH, [to, digest, id, from])) > 0;
  }

  /**
   * The bindings naming a certificate's fingerprint or one of its first
   * {@link MAX_SAN_URIS} SAN URIs, each with its machine user (which one decides is the
   * authentication path's rule, see machine-principal.ts).
   */
  bindingsOf(fingerprint: string, sanUris: readonly string[]): Awaitable<readonly CertificateBindingState[]> {
    const sans = sanUris.slice(0, MAX_SAN_URIS);
    return andThen(
      this.sql.cachedAll<BindingRow>(BINDING_QUERIES[sans.length]!, [fingerprint, ...sans]),
      toBindings,
    );
  }
}
