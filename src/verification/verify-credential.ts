import { isIP } from "node:net";
import { auditFiling } from "../admission/audit.js";
import { authenticationRefusal } from "../admission/authenticate.js";
import type { AuditLog } from "../audit.js";
import type { Authenticator } from "../auth/authenticator.js";
import { type PresentedCredential, parseCredentials } from "../auth/credentials.js";
import { MACHINE_USERNAME_PREFIX } from "../auth/machine-principal.js";
import { type PeerCertificateInfo, type Principal, TENANT_DISABLED_MESSAGE } from "../auth/principal.js";
import { hasAllScopes } from "../auth/scopes.js";
import { parseToken } from "../auth/token-format.js";
import { budgetKey, normalizeIp } from "../client-ip.js";
import type { RequestState } from "../context.js";
import { errors, isRefusal, TesseraError } from "../errors.js";
import { MAX_STRING_LENGTH } from "../interceptors/input.js";
import type { RateLimits } from "../rate-limit.js";
import { canSeeTenant, tenantScope } from "../services/common.js";

/** The stable outcome of a verification (VerifyCredential's `code`, without its enum prefix). */
export type VerificationCode =
  | "VALID"
  | "NOT_FOUND"
  | "EXPIRED"
  | "REVOKED"
  | "DISABLED"
  | "TENANT_DISABLED"
  | "INSUFFICIENT_SCOPES"
  | "NOT_ASSIGNED"
  | "RATE_LIMITED"
  | "MALFORMED";

/** How a verified credential was presented. */
export type CredentialKind = "jwt" | "pat" | "api_key" | "machine_token" | "basic";

/** What a caller asks of a credential. */
export interface VerificationInput {
  /** A token as presented (optionally with "Bearer "), or "Basic <base64(username:password)>". Never logged. */
  credential: string;
  /** Scopes the credential must hold. */
  requiredScopes?: readonly string[];
  /** When set, the credential's principal must be a machine user assigned to it. */
  applicationId?: string | undefined;
  /**
   * The address of the client that presented the credential to the caller, as the caller
   * saw it: an IP literal, checked by {@link clientAddressOf}. Set, failures are budgeted per
   * caller and client address within a per-caller budget (see createCredentialVerifier).
   */
  clientAddress?: string | undefined;
}

/** The answer about one credential. Carries no secret. */
export interface Verification {
  valid: boolean;
  code: VerificationCode;
  /** Set when the credential verified (VALID, INSUFFICIENT_SCOPES, NOT_ASSIGNED). */
  principal?: Principal;
  credentialKind?: CredentialKind;
  /** RATE_LIMITED: seconds to wait. */
  retryAfterSeconds?: number;
}

/** The verification core shared by VerifyCredential and /oauth2/introspect. */
export interface CredentialVerifier {
  /**
   * Verify `input.credential` for `caller` (authenticated and authorized already: the
   * `auth:verify` rule), whose request is `callerState`. An invalid credential is an
   * answer, not an error; faults (storage down) are thrown (or the promise rejects) as
   * they are by authentication. Synchronous when decided without awaiting (a credential
   * verified before whose row is read synchronously, as admission decides such a call).
   */
  verify(
    caller: Principal,
    callerState: RequestState,
    input: VerificationInput,
  ): Verification | Promise<Verification>;
  /** Whether `credential` has a shape Tessera issues (no I/O): anything else {@link verify} answers MALFORMED. */
  wellFormed(credential: string): boolean;
}

/** Dependencies of {@link createCredentialVerifier}. */
export interface CredentialVerifierDeps {
  authenticator: Authenticator;
  /** When set: failed verifications spend the caller's failed-authentication budget, reserved before PBKDF2. */
  limits?: RateLimits | undefined;
  audit: AuditLog;
  /** The opaque token prefixes (`auth.tokens.*Prefix`): anything else that is not a JWT is MALFORMED. */
  prefixes: readonly string[];
}

/** The audit action of a verification. */
export const VERIFY_ACTION = "credential.verify";

/**
 * The longest credential verification takes, "Bearer " included: that of any request string
 * (VerifyCredential's field is refused past it before it gets here), and introspection's too.
 * Machine access tokens are refused at issuance rather than issued past it (access-token.ts).
 */
export const MAX_CREDENTIAL_LENGTH = MAX_STRING_LENGTH;
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+$/;
const TOKEN_CHARS = /^[\x21-\x7e]+$/;

/**
 * The verification core. It is authentication, run for a credential another service was
 * presented rather than for the caller: the same verifiers (src/auth/), with their caches
 * and the state read on every call, and the same budgets (src/admission/authenticate.ts),
 * counted under the caller's own key (`verify:<kind>:<id>`): a guessing caller runs out
 * of verifications, and a service verifying its users' bad tokens never locks its own
 * address out of authenticating to Tessera. A caller that names its client's address
 * (`clientAddress`) has one such budget per client address (`verify:<kind>:<id>@<address's
 * budget key>`: the caller's own, never another's) and spends its per-caller budget
 * (`limits.verifyFailures`) beside it: a downstream service's anonymous client sending bad
 * tokens runs out alone, rather than locking every client of that service out of first uses.
 *
 * The tenant wall is the verifiers' own (`RequestState.tenantWall`, decided by
 * {@link tenantScope}, the one rule of who sees which tenant): another tenant's credential
 * is refused where an unknown one is, before its secret is looked at, so it answers
 * NOT_FOUND with the same work.
 */
export function createCredentialVerifier(deps: CredentialVerifierDeps): CredentialVerifier {
  const { authenticator, limits, audit } = deps;
  // Longest first: of two nested prefixes (`tsr_` and `tsr_mu_`) the more specific one decides.
  const prefixes = [...new Set(deps.prefixes)].sort((a, b) => b.length - a.length);

  return {
    verify(caller, callerState, input) {
      const verification = verifyOnly(caller, callerState, input);
      if (verification instanceof Promise)
        return verification.then((v) => audited(caller, callerState, input, v));
      return audited(caller, callerState, input, verification);
    },
    wellFormed: (credential) => classify(credential, prefixes) !== "malformed",
  };

  /** Write the verification to the audit log; returns it. */
  function audited(
    caller: Principal,
    callerState: RequestState,
    input: VerificationInput,
    verification: Verification,
  ): Verification {
    const p = verification.principal;
    audit.record({
      requestId: callerState.requestId,
      // A `*` caller's verification is filed in the verified credential's tenant (none when
      // nothing verified), never in the caller's own: its auditors would read that id.
      ...auditFiling(caller, p?.tenantId ?? null),
      actorKind: caller.kind,
      actorId: caller.id,
      action: VERIFY_ACTION,
      // The credential's id (never its secret), once it verified and the caller may see it.
      targetId: p?.credentialId ?? null,
      outcome: verification.valid ? "success" : "failure",
      reason: verification.code,
      // The client the caller named is the one that presented the credential (as a trusted
      // proxy's forwarded address is); the caller itself is the actor.
      ip: input.clientAddress ? normalizeIp(input.clientAddress) : callerState.ip,
    });
    return verification;
  }

  function verifyOnly(
    caller: Principal,
    callerState: RequestState,
    input: VerificationInput,
  ): Verification | Promise<Verification> {
    const presented = classify(input.credential, prefixes);
    if (presented === "malformed") return { valid: false, code: "MALFORMED" };
    // Only a machine user's Basic pair: a human password is not for other services to test.
    if (
      presented.credential.type === "basic" &&
      !presented.credential.username.startsWith(MACHINE_USERNAME_PREFIX)
    )
      return { valid: false, code: "NOT_FOUND" };
    const own = `verify:${caller.kind}:${caller.id}`;
    const client = input.clientAddress;
    const state: RequestState = {
      requestId: callerState.requestId,
      ip: client ? `${own}@${budgetKey(client)}` : own,
      certificate: presented.binding,
      principal: null,
    };
    const wall = tenantScope(caller);
    if (wall !== null) state.tenantWall = wall;
    // As admission authenticates (authenticate.ts, with the budgets): undefined once
    // `state.principal` is set, else the refusal; a promise of either unless decided without I/O.
    const wider = client && limits ? { limiter: limits.verifyFailures, key: own } : undefined;
    const refusal = authenticationRefusal({ authenticator, limits, wider }, presented.credential, state);
    if (refusal instanceof Promise) return refusal.then((r) => decided(caller, input, state, r));
    return decided(caller, input, state, refusal);
  }

  /** The answer once authentication has decided (`refusal` undefined: `state.principal` is set). */
  function decided(
    caller: Principal,
    input: VerificationInput,
    state: RequestState,
    refusal: unknown,
  ): Verification {
    if (refusal !== undefined) return refused(refusal);
    const principal = state.principal!;
    // The static admin token is no platform credential; another tenant's cannot get here
    // (the verifiers' wall), checked again as the rule says.
    if (principal.kind === "admin" || !canSeeTenant(caller, principal.tenantId ?? ""))
      return { valid: false, code: "NOT_FOUND" };
    const found = { principal, credentialKind: kindOf(principal) };
    if (input.requiredScopes && !hasAllScopes(principal.scopes, input.requiredScopes))
      return { valid: false, code: "INSUFFICIENT_SCOPES", ...found };
    if (input.applicationId !== undefined && !principal.applicationIds?.includes(input.applicationId))
      return { valid: false, code: "NOT_ASSIGNED", ...found };
    return { valid: true, code: "VALID", ...found };
  }
}

/** Longest client address taken: an IPv6 literal with an embedded IPv4 and a zone fits. */
const MAX_CLIENT_ADDRESS_LENGTH = 64;

/**
 * `raw` as a client address to budget under, or undefined when it is none (empty); throws
 * INVALID_ARGUMENT when it is not an IP literal of at most 64 characters: anything else
 * would let a caller make up budget keys at will.
 */
export function clientAddressOf(raw: string): string | undefined {
  if (raw === "") return undefined;
  if (raw.length > MAX_CLIENT_ADDRESS_LENGTH || isIP(normalizeIp(raw)) === 0)
    throw errors.invalidArgument("client_address must be an IPv4 or IPv6 address", "client_address");
  return raw;
}

/** The answer to a credential that did not verify; a fault is thrown (Unavailable, Internal). */
function refused(refusal: unknown): Verification {
  if (!(refusal instanceof TesseraError) || !isRefusal(refusal.code)) throw refusal;
  switch (refusal.reason) {
    case "TOKEN_EXPIRED":
      return { valid: false, code: "EXPIRED" };
    case "TOKEN_REVOKED":
      return { valid: false, code: "REVOKED" };
    case "PRINCIPAL_DISABLED":
      return {
        valid: false,
        code: refusal.message === TENANT_DISABLED_MESSAGE ? "TENANT_DISABLED" : "DISABLED",
      };
    case "RATE_LIMITED": {
      const retry = Number(refusal.headers["retry-after"]);
      return { valid: false, code: "RATE_LIMITED", retryAfterSeconds: Number.isFinite(retry) ? retry : 1 };
    }
    case "AUTH_HEADER_MALFORMED":
      return { valid: false, code: "MALFORMED" };
    default:
      // TOKEN_INVALID, CREDENTIALS_INVALID, AUTH_REQUIRED, TOKEN_NOT_BOUND: nothing to tell.
      return { valid: false, code: "NOT_FOUND" };
  }
}

function kindOf(principal: Principal): CredentialKind {
  switch (principal.method) {
    case "jwt":
    case "pat":
    case "api_key":
    case "machine_token":
    case "basic":
      return principal.method;
    default:
      // mtls and the admin token are never verified here (no credential string names them).
      return "machine_token";
  }
}

/**
 * The credential as authentication takes it, or "malformed" when it is of no shape Tessera
 * issues (checked without any I/O: the formats are public). A JWT's certificate binding
 * (`cnf`) becomes a stand-in certificate of the verification: the JWT verifier then accepts
 * it whatever connection carried it, and the answer names the binding for the caller to
 * check against the certificate its own client presented (RFC 8705 §3, as introspection).
 */
function classify(
  raw: string,
  prefixes: readonly string[],
): { credential: PresentedCredential; binding: PeerCertificateInfo | null } | "malformed" {
  const value = raw.trim();
  if (value.length === 0 || value.length > MAX_CREDENTIAL_LENGTH) return "malformed";
  const space = value.indexOf(" ");
  let token = value;
  if (space > 0) {
    const scheme = value.slice(0, space).toLowerCase();
    if (scheme === "basic") {
      try {
        const credential = parseCredentials({ get: (name) => (name === "authorization" ? value : null) });
        return credential?.type === "basic" ? { credential, binding: null } : "malformed";
      } catch {
        return "malformed";
      }
    }
    if (scheme !== "bearer") return "malformed";
    token = value.slice(space + 1).trim();
  }
  if (!TOKEN_CHARS.test(token)) return "malformed";
  const jwt = JWT_SHAPE.exec(token);
  if (jwt) {
    let binding: string | undefined;
    try {
      const payload: unknown = JSON.parse(Buffer.from(jwt[1]!, "base64url").toString("utf8"));
      if (typeof payload !== "object" || payload === null) return "malformed";
      const cnf = (payload as { cnf?: unknown }).cnf;
      const x5t =
        typeof cnf === "object" && cnf !== null ? (cnf as Record<string, unknown>)["x5t#S256"] : undefined;
      if (typeof x5t === "string") binding = x5t;
    } catch {
      return "malformed";
    }
    return {
      credential: { type: "bearer", token },
      binding:
        binding === undefined
          ? null
          : { thumbprint: binding, sha256Fingerprint: "", commonName: null, sanUris: Object.freeze([]) },
    };
  }
  const parsed = parseToken(token, prefixes);
  if (parsed === null || parsed === "malformed") return "malformed";
  return { credential: { type: "bearer", token }, binding: null };
}
