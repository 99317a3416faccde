import { PrincipalKind } from "../../gen/tessera/v1/options_pb.js";

/** How a principal proved who it is. */
export type AuthMethod =
  | "jwt"
  | "pat"
  | "api_key"
  | "basic"
  | "password"
  | "machine_token"
  | "mtls"
  | "admin_token";

/** A verified client certificate, as the TLS layer presented it. */
export interface PeerCertificateInfo {
  /** SHA-256 of the DER certificate, lowercase hex without colons. */
  sha256Fingerprint: string;
  /** The same digest base64url-encoded: RFC 8705 `x5t#S256`. */
  thumbprint: string;
  /** Subject common name, if any. */
  commonName: string | null;
  /** URI subject alternative names (e.g. SPIFFE ids). */
  sanUris: readonly string[];
  /**
   * Epoch ms past which it authenticates nothing: the earliest notAfter of its chain. A stream
   * it authenticated ends there, as its connection's next request is refused.
   */
  notAfter?: number;
}

/** Who is calling, after authentication. Carries no secret. */
export interface Principal {
  kind: "user" | "machine" | "admin";
  method: AuthMethod;
  /** User id, machine-user id, or "admin-token". */
  id: string;
  /** Null only for the static admin token, which spans tenants. */
  tenantId: string | null;
  username?: string;
  /** Effective scopes for this request. */
  scopes: readonly string[];
  /** Machine users: the applications they are assigned to. */
  applicationIds?: readonly string[];
  /** The token row (PAT, API key, machine token) or JWT id that authenticated the call. */
  credentialId?: string;
  /** The verified client certificate of the connection, if any. */
  certificate?: PeerCertificateInfo | null;
  /** Epoch ms at which the credential stops by itself (token expiry, JWT `exp`, the end of a rotation's grace period); null or absent: it does not. */
  expiresAt?: number | null;
  /** Epoch ms at which a JWT was issued (`iat`). */
  issuedAt?: number;
  /** The session a user's access token belongs to (its `sid`). */
  sessionId?: string;
  /** RFC 8705 `x5t#S256` the credential (a JWT) is bound to. */
  certificateBinding?: string;
  /**
   * A machine access token issued to a client certificate alone (marked: certificate-token.ts):
   * that certificate's fingerprint and SAN URIs, which must keep authenticating as the token's
   * machine user for the token to hold.
   */
  grantingCertificate?: Pick<PeerCertificateInfo, "sha256Fingerprint" | "sanUris">;
}

/** The message of the refusal of a credential whose tenant is disabled (verification tells it from a disabled principal by it). */
export const TENANT_DISABLED_MESSAGE = "tenant is disabled";

/**
 * Whether the tenant wall of a verification (`RequestState.tenantWall`) stands between
 * the verifying caller and a credential of `tenantId`: such a credential must be refused
 * exactly as an unknown one is, before its secret is looked at.
 */
export function walledOff(state: { tenantWall?: string | undefined }, tenantId: string): boolean {
  return state.tenantWall !== undefined && state.tenantWall !== tenantId;
}

/** Whether an auth rule's principal kind admits this principal. */
export function admits(kind: PrincipalKind, principal: Principal): boolean {
  switch (kind) {
    case PrincipalKind.USER:
      return principal.kind === "user";
    case PrincipalKind.MACHINE_USER:
      return principal.kind === "machine" && principal.method !== "mtls";
    case PrincipalKind.MTLS_CLIENT:
      return principal.kind === "machine" && principal.method === "mtls";
    case PrincipalKind.ADMIN_TOKEN:
      return principal.kind === "admin";
    default:
      return false;
  }
}

/** Whether the principal may act across tenants (holds the bare `*` scope). */
export function isSuperuser(principal: Principal): boolean {
  return principal.scopes.includes("*");
}
