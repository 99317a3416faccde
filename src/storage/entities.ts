import { EntitySchema, type Opt } from "@mikro-orm/core";
import { MACHINE_ENTITIES } from "./machine-entities.js";
import { ApiTokenSchema } from "./token-entities.js";

/**
 * Entities are plain classes described by EntitySchema (no decorators, no reflect-metadata).
 * Foreign keys are plain id columns: the hot authentication path reads rows with raw
 * prepared statements (see auth-store.ts), and handlers never need lazy relations.
 * Column names follow the underscore naming strategy (createdAt -> created_at).
 */

/** A tenant: the isolation boundary of users, machine users, applications and tokens. */
export class Tenant {
  id!: string;
  name!: string;
  disabled = false;
  createdAt: Date = new Date();
  updatedAt: Date = new Date();
}

export const TenantSchema = new EntitySchema<Tenant>({
  class: Tenant,
  tableName: "tenants",
  properties: {
    id: { type: "string", primary: true, length: 36 },
    name: { type: "string", length: 200, unique: true },
    disabled: { type: "boolean", default: false },
    createdAt: { type: "Date" },
    updatedAt: { type: "Date", onUpdate: () => new Date() },
  },
});

/** A human user. `scopes` is space-separated, normalised by formatScopes. */
export class User {
  id!: string;
  tenantId!: string;
  username!: string;
  passwordHash!: string;
  scopes = "";
  disabled = false;
  /**
   * May log in with a username alone although outside the default tenant: set for the
   * users that existed while usernames were global (migration 20261204213000), never for
   * a new user.
   */
  tenantlessLogin: Opt<boolean> = false;
  createdAt: Date = new Date();
  updatedAt: Date = new Date();
}

export const UserSchema = new EntitySchema<User>({
  class: User,
  tableName: "users",
  // Unique per tenant: another tenant's usernames must not read as taken.
  uniques: [{ properties: ["tenantId", "username"] }],
  properties: {
    id: { type: "string", primary: true, length: 36 },
    tenantId: { type: "string", length: 36, index: true },
    username: { type: "string", length: 200, index: true },
    passwordHash: { type: "string", length: 255 },
    scopes: { type: "text", default: "" },
    disabled: { type: "boolean", default: false },
    tenantlessLogin: { type: "boolean", default: false },
    createdAt: { type: "Date" },
    updatedAt: { type: "Date", onUpdate: () => new Date() },
  },
});

/**
 * A refresh token. Only the SHA-256 of the token is stored: the token carries 256 bits
 * of randomness, so a slow hash adds nothing. Tokens of one login form a family; re-use of
 * a spent member revokes the family (OAuth 2.0 Security BCP, refresh token rotation).
 */
export class RefreshToken {
  id!: string;
  familyId!: string;
  userId!: string;
  tokenHash!: string;
  createdAt: Date = new Date();
  expiresAt!: Date;
  spentAt?: Date | null = null;
  revokedAt?: Date | null = null;
}

export const RefreshTokenSchema = new EntitySchema<RefreshToken>({
  class: RefreshToken,
  tableName: "refresh_tokens",
  // A session's live refresh tokens (session pruning); it serves lookups by family too.
  indexes: [{ properties: ["familyId", "expiresAt"], name: "refresh_tokens_family_id_expires_at_index" }],
  properties: {
    id: { type: "string", primary: true, length: 36 },
    familyId: { type: "string", length: 36 },
    userId: { type: "string", length: 36, index: true },
    tokenHash: { type: "string", length: 64, unique: true },
    createdAt: { type: "Date" },
    expiresAt: { type: "Date" },
    spentAt: { type: "Date", nullable: true },
    revokedAt: { type: "Date", nullable: true },
  },
});

/**
 * A session: one login, i.e. one refresh-token family (`id` is the family id). Access
 * tokens issued to it carry `id` as their `sid` claim and are refused once `revokedAt` is
 * set (logout, refresh-token reuse, password change or reset, disabling the user). A
 * revoked session never comes back: re-enabling a user does not clear `revokedAt`.
 */
export class Session {
  id!: string;
  userId!: string;
  createdAt: Date = new Date();
  revokedAt?: Date | null = null;
}

export const SessionSchema = new EntitySchema<Session>({
  class: Session,
  tableName: "sessions",
  // Session pruning has two partial indexes (revoked ones by revoked_at, the others by
  // created_at and id), made by Migration20261206060000_session_prune_indexes: this schema
  // cannot declare a predicate.
  properties: {
    id: { type: "string", primary: true, length: 36 },
    userId: { type: "string", length: 36, index: true },
    createdAt: { type: "Date" },
    revokedAt: { type: "Date", nullable: true },
  },
});

/** An asymmetric JWT signing key (JWK). Retired keys keep verifying until their tokens expire. */
export class SigningKey {
  kid!: string;
  alg!: string;
  privateJwk!: string;
  publicJwk!: string;
  createdAt: Date = new Date();
  /** When it stops signing: its successor's `activatesAt` (null while it has none). */
  retiredAt?: Date | null = null;
  /** When it starts signing; published from `createdAt` on (pre-publication). Null: `createdAt`. */
  activatesAt?: Date | null = null;
  /** 1, 2, 3… in creation order, unique: the next one is inserted by exactly one instance. */
  generation?: number | null = null;
}

export const SigningKeySchema = new EntitySchema<SigningKey>({
  class: SigningKey,
  tableName: "signing_keys",
  properties: {
    kid: { type: "string", primary: true, length: 64 },
    alg: { type: "string", length: 16 },
    privateJwk: { type: "text" },
    publicJwk: { type: "text" },
    createdAt: { type: "Date" },
    retiredAt: { type: "Date", nullable: true },
    activatesAt: { type: "Date", nullable: true },
    generation: { type: "integer", nullable: true },
  },
});

/** One audit record. Never holds a secret: actor, action, target ids and outcome only. */
export class AuditEvent {
  id!: string;
  at: Date = new Date();
  requestId!: string;
  tenantId?: string | null = null;
  /** 1: the actor is not of `tenantId`, shown to that tenant's readers as the platform; else 0. */
  actorOutside = 0;
  actorKind!: string;
  actorId?: string | null = null;
  action!: string;
  targetId?: string | null = null;
  outcome!: string;
  reason?: string | null = null;
  ip?: string | null = null;
}

export const AuditEventSchema = new EntitySchema<AuditEvent>({
  class: AuditEvent,
  tableName: "audit_events",
  properties: {
    id: { type: "string", primary: true, length: 36 },
    at: { type: "Date", index: true },
    requestId: { type: "string", length: 64 },
    tenantId: { type: "string", length: 36, nullable: true, index: true },
    actorOutside: { type: "smallint", default: 0 },
    actorKind: { type: "string", length: 32 },
    actorId: { type: "string", length: 64, nullable: true },
    action: { type: "string", length: 128 },
    targetId: { type: "string", length: 64, nullable: true },
    outcome: { type: "string", length: 32 },
    reason: { type: "string", length: 64, nullable: true },
    ip: { type: "string", length: 64, nullable: true },
  },
});

/**
 * Entity schemas registered with the ORM. Feature modules append theirs here
 * (one line each) so initORM stays the single place that knows them all.
 */
// biome-ignore lint/suspicious/noExplicitAny: schemas of different entity types share one list
export const ENTITIES: EntitySchema<any>[] = [
  TenantSchema,
  UserSchema,
  RefreshTokenSchema,
  SessionSchema,
  SigningKeySchema,
  AuditEventSchema,
  ApiTokenSchema,
  ...MACHINE_ENTITIES,
];
