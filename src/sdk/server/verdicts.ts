// What a downstream call presents and how Tessera's verdicts refuse it: the credential in
// an Authorization header, and VerifyCredential's codes as the SDK's refusals. Apart from
// the core (tessera-auth.ts) so that file stays one concept: deciding who is calling.

import { VerificationCode } from "../../../gen/tessera/v1/verification_service_pb.js";
import { hasScope } from "../../auth/scopes.js";
import { TesseraAuthError, type TesseraAuthReason } from "./errors.js";
import type { TesseraPrincipal } from "./principal.js";

/** VerifyCredential's codes that refuse a call, with the reason and message the SDK answers. */
export const REFUSALS: Partial<Record<VerificationCode, [TesseraAuthReason, string]>> = {
  [VerificationCode.NOT_FOUND]: ["CREDENTIALS_INVALID", "credentials are invalid"],
  [VerificationCode.MALFORMED]: ["TOKEN_INVALID", "credential is malformed"],
  [VerificationCode.EXPIRED]: ["TOKEN_EXPIRED", "credential expired"],
  [VerificationCode.REVOKED]: ["TOKEN_REVOKED", "credential is revoked"],
  [VerificationCode.DISABLED]: ["PRINCIPAL_DISABLED", "principal is disabled"],
  [VerificationCode.TENANT_DISABLED]: ["PRINCIPAL_DISABLED", "tenant is disabled"],
};

/** The longest Authorization header read; a longer one is refused before any work. */
const MAX_HEADER = 8192;

/** Tessera unreachable or failing: UNAVAILABLE, with when to retry. */
export function unavailable(message: string, err?: unknown, retryAfterSeconds = 1): TesseraAuthError {
  return new TesseraAuthError("UNAVAILABLE", message, { retryAfterSeconds, cause: err });
}

/** The credential in an Authorization header value: a bearer token, or a whole Basic pair. */
export function credentialOf(authorization: string | undefined): string {
  if (authorization === undefined || authorization === "")
    throw new TesseraAuthError("AUTH_REQUIRED", "authentication required");
  if (authorization.length > MAX_HEADER)
    throw new TesseraAuthError("AUTH_HEADER_MALFORMED", "authorization header is too long");
  const space = authorization.indexOf(" ");
  const scheme = space > 0 ? authorization.slice(0, space).toLowerCase() : "";
  const value = space > 0 ? authorization.slice(space + 1) : "";
  if (!/^[\x21-\x7e]+$/.test(value) || (scheme !== "bearer" && scheme !== "basic"))
    throw new TesseraAuthError("AUTH_HEADER_MALFORMED", "authorization header is malformed");
  return scheme === "basic" ? `Basic ${value}` : value;
}

/** A method's (or route's) rule: `tessera.v1.AuthRule`'s fields the downstream reads. */
export interface DownstreamRule {
  public?: boolean;
  scopes?: readonly string[];
  /** Principal kinds admitted; empty: any. Values of `tessera.v1.PrincipalKind` (1 user, 2 machine user). */
  principals?: readonly number[];
}

/** Whether `rule` admits `principal`. @throws TesseraAuthError ACCESS_DENIED or PRINCIPAL_NOT_ALLOWED */
export function authorize(principal: TesseraPrincipal, rule: DownstreamRule): void {
  if (rule.principals && rule.principals.length > 0) {
    const kind = principal.kind === "user" ? 1 : 2;
    if (!rule.principals.includes(kind))
      throw new TesseraAuthError("PRINCIPAL_NOT_ALLOWED", "this kind of principal may not call this method");
  }
  const required = rule.scopes;
  if (required === undefined) return;
  for (const scope of required)
    if (!hasScope(principal.scopes, scope))
      throw new TesseraAuthError("ACCESS_DENIED", `missing scope ${scope}`, { requiredScopes: required });
}
