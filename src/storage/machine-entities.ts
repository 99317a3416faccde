import { EntitySchema } from "@mikro-orm/core";

/**
 * Machine users, the applications they serve and the backends they register (seed 000).
 * Foreign keys are plain id columns, as in entities.ts; the database cascades deletes
 * (a deleted tenant, application or machine user takes its dependent rows with it).
 */

/** An application inside a tenant; machine users are assigned to applications. */
export class Application {
  id!: string;
  tenantId!: string;
  name!: string;
  createdAt: Date = new Date();
}

export const ApplicationSchema = new EntitySchema<Application>({
  class: Application,
  tableName: "applications",
  uniques: [{ properties: ["tenantId", "name"] }],
  properties: {
    id: { type: "string", primary: true, length: 36 },
    tenantId: { type: "string", length: 36, index: true },
    name: { type: "string", length: 200 },
    createdAt: { type: "Date" },
  },
});

/** How a machine user presents its credentials in a header. */
export type MachineAuthKind = "bearer" | "basic";

/**
 * A service-to-service principal. Its secrets live in {@link MachineCredential} rows
 * (several during a rotation grace period); `scopes` is space-separated like users'.
 * `rotatedAt`/`rotationGraceUntil` let the access-token loader refuse JWTs issued
 * before the last rotation once the previous credentials have stopped working.
 */
export class MachineUser {
  id!: string;
  tenantId!: string;
  name!: string;
  authType!: MachineAuthKind;
  scopes = "";
  disabled = false;
  createdAt: Date = new Date();
  updatedAt: Date = new Date();
  lastUsedAt?: Date | null = null;
  rotatedAt?: Date | null = null;
  rotationGraceUntil?: Date | null = null;
  /** Machine access tokens issued up to this instant (by `iat`'s second) are refused for good. */
  tokensRevokedBefore?: Date | null = null;
}

export const MachineUserSchema = new EntitySchema<MachineUser>({
  class: MachineUser,
  tableName: "machine_users",
  uniques: [{ properties: ["tenantId", "name"] }],
  properties: {
    id: { type: "string", primary: true, length: 36 },
    tenantId: { type: "string", length: 36, index: true },
    name: { type: "string", length: 200 },
    authType: { type: "string", length: 16 },
    scopes: { type: "text", default: "" },
    disabled: { type: "boolean", default: false },
    createdAt: { type: "Date" },
    updatedAt: { type: "Date", onUpdate: () => new Date() },
    lastUsedAt: { type: "Date", nullable: true },
    rotatedAt: { type: "Date", nullable: true },
    rotationGraceUntil: { type: "Date", nullable: true },
    tokensRevokedBefore: { type: "Date", nullable: true },
  },
});

/**
 * One credential of a machine user. `publicId` is what the request names, found with one
 * indexed look-up: the 16-character id inside a bearer token, or the generated Basic
 * username. Only the PBKDF2 hash of the secret (token secret or password) is stored.
 * A rotated-out credential keeps working until `expiresAt`.
 */
export class MachineCredential {
  id!: string;
  machineUserId!: string;
  kind!: MachineAuthKind;
  publicId!: string;
  secretHash!: string;
  /** Bearer: prefix and last four characters, for display. */
  hint = "";
  createdAt: Date = new Date();
  expiresAt?: Date | null = null;
  lastUsedAt?: Date | null = null;
}

export const MachineCredentialSchema = new EntitySchema<MachineCredential>({
  class: MachineCredential,
  tableName: "machine_credentials",
  properties: {
    id: { type: "string", primary: true, length: 36 },
    machineUserId: { type: "string", length: 36, index: true },
    kind: { type: "string", length: 16 },
    publicId: { type: "string", length: 64, unique: true },
    secretHash: { type: "string", length: 255 },
    hint: { type: "string", length: 64, default: "" },
    createdAt: { type: "Date" },
    expiresAt: { type: "Date", nullable: true },
    lastUsedAt: { type: "Date", nullable: true },
  },
});

/** Assignment of a machine user to an application of its tenant. */
export class MachineUserApplication {
  machineUserId!: string;
  applicationId!: string;
}

export const MachineUserApplicationSchema = new EntitySchema<MachineUserApplication>({
  class: MachineUserApplication,
  tableName: "machine_user_applications",
  properties: {
    machineUserId: { type: "string", primary: true, length: 36 },
    applicationId: { type: "string", primary: true, length: 36, index: true },
  },
});

/**
 * A client certificate tied to a machine user, by SHA-256 fingerprint (one certificate)
 * or by URI SAN (every certificate carrying it). Exactly one of the two is set; each is
 * unique across all tenants. `proven`: bound over a connection presenting the certificate
 * itself (proof of possession). A certificate matching a proven binding authenticates as
 * its machine user; one matching only unproven bindings in two tenants authenticates no
 * one (machineOfCertificate, src/auth/machine-principal.ts).
 */
export class MachineUserCertificate {
  id!: string;
  machineUserId!: string;
  sha256Fingerprint?: string | null = null;
  sanUri?: string | null = null;
  proven = false;
  /**
   * The binder's effective scopes at bind time, space-separated (null: bound before they
   * were recorded, read as none). See machineOfCertificate.
   */
  binderScopes?: string | null = null;
  createdAt: Date = new Date();
}

export const MachineUserCertificateSchema = new EntitySchema<MachineUserCertificate>({
  class: MachineUserCertificate,
  tableName: "machine_user_certificates",
  properties: {
    id: { type: "string", primary: true, length: 36 },
    machineUserId: { type: "string", length: 36, index: true },
    sha256Fingerprint: {
      type: "string",
      fieldName: "sha256_fingerprint",
      length: 64,
      nullable: true,
      unique: true,
    },
    sanUri: { type: "string", length: 2048, nullable: true, unique: true },
    proven: { type: "boolean", default: false },
    binderScopes: { type: "text", fieldName: "binder_scopes", nullable: true },
    createdAt: { type: "Date" },
  },
});

/** A backend a machine user registered for an application (seed 000's register-backend). */
export class Backend {
  id!: string;
  tenantId!: string;
  applicationId!: string;
  machineUserId!: string;
  callbackUrl!: string;
  version = "";
  createdAt: Date = new Date();
  updatedAt: Date = new Date();
}

export const BackendSchema = new EntitySchema<Backend>({
  class: Backend,
  tableName: "backends",
  uniques: [{ properties: ["applicationId", "callbackUrl"] }],
  properties: {
    id: { type: "string", primary: true, length: 36 },
    tenantId: { type: "string", length: 36, index: true },
    applicationId: { type: "string", length: 36 },
    machineUserId: { type: "string", length: 36, index: true },
    callbackUrl: { type: "string", length: 2048 },
    version: { type: "string", length: 64, default: "" },
    createdAt: { type: "Date" },
    updatedAt: { type: "Date", onUpdate: () => new Date() },
  },
});

/** The machine-user feature's entity schemas (appended to ENTITIES). */
export const MACHINE_ENTITIES = [
  ApplicationSchema,
  MachineUserSchema,
  MachineCredentialSchema,
  MachineUserApplicationSchema,
  MachineUserCertificateSchema,
  BackendSchema,
];
