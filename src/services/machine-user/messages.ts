// Conversions between machine-user rows and their protobuf messages (and the auth-type enum
// back to the stored kind), shared by the admin, binding and backend handlers.
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type BackendSchema,
  type CertificateBindingSchema,
  MachineAuthType,
  type MachineUserSchema,
} from "../../../gen/tessera/v1/machine_user_service_pb.js";
import { parseScopeString } from "../../auth/scopes.js";
import { errors } from "../../errors.js";
import type {
  Backend,
  MachineAuthKind,
  MachineCredential,
  MachineUser,
  MachineUserCertificate,
} from "../../storage/machine-entities.js";

const AUTH_TYPES: Record<MachineAuthKind, MachineAuthType> = {
  bearer: MachineAuthType.BEARER,
  basic: MachineAuthType.BASIC,
};

export function authKind(type: MachineAuthType): MachineAuthKind {
  if (type === MachineAuthType.BEARER) return "bearer";
  if (type === MachineAuthType.BASIC) return "basic";
  throw errors.invalidArgument(
    "auth_type must be MACHINE_AUTH_TYPE_BEARER or MACHINE_AUTH_TYPE_BASIC",
    "auth_type",
  );
}

/** Rows shown with a machine user. */
export interface MachineDetails {
  credentials: MachineCredential[];
  applicationIds: string[];
  certificates: MachineUserCertificate[];
}

export function bindingToProto(b: MachineUserCertificate): MessageInitShape<typeof CertificateBindingSchema> {
  return {
    id: b.id,
    sha256Fingerprint: b.sha256Fingerprint ?? "",
    sanUri: b.sanUri ?? "",
    createdAt: timestampFromDate(b.createdAt),
    proven: b.proven,
  };
}

export function machineUserToProto(
  mu: MachineUser,
  d: MachineDetails,
): MessageInitShape<typeof MachineUserSchema> {
  // The current credential is the one without an end; rotated-out ones are in their grace period.
  const current = d.credentials
    .filter((c) => !c.expiresAt)
    .sort((a, b) => b.createdAt.getTime() - a.createdAt.getTime())[0];
  return {
    id: mu.id,
    tenantId: mu.tenantId,
    name: mu.name,
    authType: AUTH_TYPES[mu.authType],
    scopes: parseScopeString(mu.scopes),
    applicationIds: [...d.applicationIds].sort(),
    disabled: mu.disabled,
    username: current && current.kind === "basic" ? current.publicId : "",
    tokenHint: current && current.kind === "bearer" ? current.hint : "",
    certificates: d.certificates.map(bindingToProto),
    createdAt: timestampFromDate(mu.createdAt),
    updatedAt: timestampFromDate(mu.updatedAt),
    ...(mu.lastUsedAt ? { lastUsedAt: timestampFromDate(mu.lastUsedAt) } : {}),
  };
}

export function backendToProto(b: Backend): MessageInitShape<typeof BackendSchema> {
  return {
    id: b.id,
    tenantId: b.tenantId,
    applicationId: b.applicationId,
    machineUserId: b.machineUserId,
    callbackUrl: b.callbackUrl,
    version: b.version,
    createdAt: timestampFromDate(b.createdAt),
    updatedAt: timestampFromDate(b.updatedAt),
  };
}
