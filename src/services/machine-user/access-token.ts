import { setTimeout as sleep } from "node:timers/promises";
import type { EntityManager } from "@mikro-orm/knex";
import type { JwtService } from "../../auth/jwt.js";
import type { PeerCertificateInfo, Principal } from "../../auth/principal.js";
import type { Clock } from "../../clock.js";
import { errors, TesseraError } from "../../errors.js";
import { MachineCredential, MachineUser, MachineUserCertificate } from "../../storage/machine-entities.js";
import { MAX_SAN_URIS } from "../../storage/repositories/subject-state.js";
import { MAX_CREDENTIAL_LENGTH } from "../../verification/verify-credential.js";

/** The longest access token issued: one that verifies presented with "Bearer " too. */
const MAX_ISSUED_TOKEN_LENGTH = MAX_CREDENTIAL_LENGTH - "Bearer ".length;

/** What issuing a machine access token needs. */
export interface MachineTokenIssuerDeps {
  jwt: JwtService;
  /** auth.jwt.accessTokenTtl */
  accessTokenTtlSeconds: number;
  clock: Clock;
}

/** A machine access token as issued. */
export interface IssuedMachineToken {
  token: string;
  expiresAt: Date;
  /** The scopes the token carries. */
  scopes: readonly string[];
  certificateBound: boolean;
}

/**
 * Issue a short-lived access token (JWT) to the authenticated machine principal, carrying
 * `scopes` (the caller checked they are within the principal's; default: all of them),
 * bound to `certificate` when the connection presented one (RFC 8705). The one
 * implementation behind IssueAccessToken and the OAuth 2.0 token endpoint's
 * client_credentials grant, so that both keep the same rules:
 * - an access token cannot be exchanged for another (else a token renews itself forever,
 *   outliving a rotation or its credential);
 * - never issued within the second of the last rotation (`iat` has one-second resolution
 *   and tokens from that second count as pre-rotation);
 * - a credential in its rotation grace period issues tokens that end with it;
 * - a certificate's own token (marked with its SAN URIs) too long to verify is refused.
 */
export async function issueMachineAccessToken(
  deps: MachineTokenIssuerDeps,
  em: EntityManager,
  principal: Principal,
  certificate: PeerCertificateInfo | null,
  scopes: readonly string[] = principal.scopes,
): Promise<IssuedMachineToken> {
  if (principal.method === "jwt") {
    throw new TesseraError(
      "ACCESS_DENIED",
      "an access token cannot be exchanged for another; use the machine user's credentials or client certificate",
    );
  }
  if (principal.kind !== "machine" || !principal.tenantId)
    throw new TesseraError("ACCESS_DENIED", "not a machine principal");
  const mu = await em.findOne(MachineUser, { id: principal.id });
  if (!mu) throw new TesseraError("TOKEN_REVOKED", "the credential's machine user no longer exists");
  if (mu.rotatedAt) {
    const wait = (Math.floor(mu.rotatedAt.getTime() / 1000) + 1) * 1000 - deps.clock();
    if (wait > 0) await sleep(wait);
  }
  let ttlSeconds: number | undefined;
  const credentialId =
    principal.method === "machine_token" || principal.method === "basic" ? principal.credentialId : undefined;
  if (credentialId) {
    const cred = await em.findOne(MachineCredential, { id: credentialId });
    if (cred?.expiresAt) {
      // Its exp is at or before the grace period's end, and is enforced exactly (jwt.ts).
      ttlSeconds = Math.floor((cred.expiresAt.getTime() - deps.clock()) / 1000);
      if (ttlSeconds <= 0)
        throw new TesseraError("TOKEN_REVOKED", "credentials were replaced by a credential rotation");
      ttlSeconds = Math.min(ttlSeconds, deps.accessTokenTtlSeconds);
    }
  }
  const thumbprint = certificate?.thumbprint;
  // Issued to the certificate alone (not to a password or token sent over its connection):
  // its authority is the certificate's binding, re-decided from these claims at every use.
  const certificateSanUris =
    principal.method === "mtls" && certificate ? certificate.sanUris.slice(0, MAX_SAN_URIS) : undefined;
  const issued = await deps.jwt.issue({
    subject: principal.id,
    tenantId: principal.tenantId,
    scopes: [...scopes],
    kind: "machine",
    ...(thumbprint ? { certificateThumbprint: thumbprint } : {}),
    ...(certificateSanUris ? { certificateSanUris } : {}),
    ...(ttlSeconds !== undefined ? { ttlSeconds } : {}),
  });
  // Its claims carry the SAN URIs, of any length: past what verification takes, the token
  // would work on Tessera's own calls while VerifyCredential and introspection refuse it. An
  // unmarked token instead would leave the certificate's binding out of its authority.
  if (certificateSanUris && issued.token.length > MAX_ISSUED_TOKEN_LENGTH)
    throw errors.invalidArgument(
      `the client certificate's SAN URIs make its access token too long to verify (over ${MAX_ISSUED_TOKEN_LENGTH} characters): use a certificate with fewer or shorter SAN URIs`,
    );
  // A certificate's binding was read when the call was authenticated. Checked again after the
  // signature, no lock needed: a binding gone refuses the token; one still seen means the
  // unbinding commits later, and its cut-off (iat up to its second, inclusive) reaches the
  // second its commit is seen in (raiseRevocationCutoff), so it ends this token (on clocks
  // that agree: iat is this instance's).
  // The same for a token or password: a rotation committed since the read above deleted the
  // credential or set its end (its cut-off, read before it hashed, may be a second before this
  // token's iat); one still seen as it was commits later, and raises its cut-off to its
  // commit's second (raiseRotationCutoff), which covers this token.
  if (credentialId) {
    const cred = await em.findOne(
      MachineCredential,
      { id: credentialId },
      { fields: ["expiresAt"], disableIdentityMap: true },
    );
    if (!cred || (cred.expiresAt && cred.expiresAt.getTime() < issued.expiresAt.getTime()))
      throw new TesseraError("TOKEN_REVOKED", "credentials were replaced by a credential rotation");
  }
  // A disable commits its cut-off (revokeMachineAccessTokens) before its caller may re-enable
  // the machine user; a token signed after that commit, by a call authenticated before it,
  // bears a later second, and would work again once the machine user is enabled.
  const state = await em.findOne(
    MachineUser,
    { id: mu.id },
    { fields: ["disabled"], disableIdentityMap: true },
  );
  if (!state) throw new TesseraError("TOKEN_REVOKED", "the credential's machine user no longer exists");
  if (state.disabled) throw new TesseraError("PRINCIPAL_DISABLED", "machine user is disabled");
  if (principal.method === "mtls" && principal.credentialId) {
    const bound = await em.count(MachineUserCertificate, {
      id: principal.credentialId,
      machineUserId: mu.id,
    });
    if (bound === 0) throw new TesseraError("TOKEN_REVOKED", "the client certificate is no longer bound");
  }
  return {
    token: issued.token,
    expiresAt: issued.expiresAt,
    scopes,
    certificateBound: thumbprint !== undefined,
  };
}

/**
 * End every access token the machine user was issued up to now (RFC 7009: revoking one of
 * a client's access tokens may revoke the others of the same grant; a client_credentials
 * grant is the client's credentials, so they are all of one grant). Its credentials stay.
 *
 * Through the rotation cut-off the claims loader already checks on every request
 * (machine-principal.ts): tokens with `iat` up to this second are refused once the cut-off
 * has passed, and it is set `clockSkewSeconds` in the past so that an instance whose clock
 * lags refuses them too. The next rotation keeps this earlier cut-off (fail closed: see
 * RotateMachineUserCredentials), so nothing revoked here comes back.
 */
export async function revokeMachineAccessTokens(
  em: EntityManager,
  machineUserId: string,
  now: number,
  clockSkewSeconds: number,
): Promise<boolean> {
  const changed = await em.nativeUpdate(
    MachineUser,
    { id: machineUserId },
    {
      rotatedAt: new Date(now),
      rotationGraceUntil: new Date(now - clockSkewSeconds * 1000),
      updatedAt: new Date(now),
    },
  );
  return changed > 0;
}

/**
 * After a revocation (revokeMachineAccessTokens: an unbinding, `/oauth2/revoke`, a disable)
 * committed, its cut-off `cutoff` read before the commit: raise the cut-off to `now`, read
 * once the commit is visible, when a second has begun since. A token signed between the
 * clock read and the commit (e.g. an IssueAccessToken over the certificate that still saw
 * the binding after signing) has its `iat` at or before `now`'s second; without this it
 * could be the second after `cutoff`'s, and outlive the revocation. Conditional on the row
 * holding an earlier cut-off: a later one (another revocation or rotation) already covers it.
 */
export async function raiseRevocationCutoff(
  em: EntityManager,
  machineUserId: string,
  cutoff: number,
  now: number,
  clockSkewSeconds: number,
): Promise<void> {
  const second = Math.floor(now / 1000) * 1000;
  if (cutoff >= second) return;
  await em.nativeUpdate(
    MachineUser,
    { id: machineUserId, rotatedAt: { $lt: new Date(second) } },
    {
      rotatedAt: new Date(now),
      rotationGraceUntil: new Date(now - clockSkewSeconds * 1000),
      updatedAt: new Date(now),
    },
  );
}

/**
 * After a rotation committed (its cut-off `rotatedAt` read before it hashed the new secret):
 * raise the cut-off to `now`, read once the commit is visible, when a second has begun
 * since, keeping the grace period it wrote. A token the previous credentials obtained while
 * the rotation hashed and committed was signed before the commit, so its `iat` is at or
 * before `now`'s second; without this it could be a second after the cut-off's, and outlive
 * its credential. Conditional on the row holding an earlier cut-off: a later one covers it.
 */
export async function raiseRotationCutoff(
  em: EntityManager,
  machineUserId: string,
  now: number,
): Promise<void> {
  const second = Math.floor(now / 1000) * 1000;
  await em.nativeUpdate(
    MachineUser,
    { id: machineUserId, rotatedAt: { $lt: new Date(second) } },
    { rotatedAt: new Date(now), updatedAt: new Date(now) },
  );
}

/** The rotation state of a machine user's row, as read. */
export interface RotationState {
  rotatedAt: Date | null;
  rotationGraceUntil: Date | null;
  tokensRevokedBefore: Date | null;
}

/** The rotation state of a machine user's row (its unloaded fields as none). */
export function rotationStateOf(row: Pick<MachineUser, keyof RotationState>): RotationState {
  return {
    rotatedAt: row.rotatedAt ?? null,
    rotationGraceUntil: row.rotationGraceUntil ?? null,
    tokensRevokedBefore: row.tokensRevokedBefore ?? null,
  };
}

/** The rotation state of machine user `id` as the database holds it now (null: no such row). */
export async function readRotationState(em: EntityManager, id: string): Promise<RotationState | null> {
  const row = await em.findOne(
    MachineUser,
    { id },
    { fields: ["rotatedAt", "rotationGraceUntil", "tokensRevokedBefore"], disableIdentityMap: true },
  );
  return row === null ? null : rotationStateOf(row);
}

/**
 * Write a rotation's access-token cut-off to the machine user's row (in the rotation's
 * transaction `tx`), merged with what the row holds, read under the row's lock (FOR UPDATE;
 * SQLite: the one write transaction) as `seen`, not with what the rotation read before it
 * hashed the new secret: a revocation (revokeMachineAccessTokens) or another rotation that
 * committed in between stands. Only one cut-off is kept, so the merge fails closed:
 * `rotatedAt` is the later of the two (every token issued up to either is covered), and the
 * grace period ends at the earlier of the two while the stored one may still cover unexpired
 * tokens (`windowMs`: the access-token lifetime and the clock skew after the stored rotation).
 *
 * Not conditional on the row still holding `seen`: under the lock it does, and a comparison
 * of timestamps read at milliseconds with ones written at microseconds (an operator's SQL
 * `now()`) never matched, refusing every rotation of that machine user for good.
 * @returns the state written
 * @throws TesseraError NOT_FOUND (via `gone`) when the machine user no longer exists
 */
export async function recordRotation(
  tx: EntityManager,
  machineUserId: string,
  seen: RotationState,
  rotation: { now: Date; graceUntil: Date; windowMs: number },
  gone: () => Error,
): Promise<RotationState> {
  const written = mergeRotation(seen, rotation);
  const changed = await tx.nativeUpdate(
    MachineUser,
    { id: machineUserId },
    { ...written, updatedAt: rotation.now },
  );
  if (changed === 0) throw gone();
  return written;
}

/** The cut-off a rotation leaves, given the row's (see {@link recordRotation}). */
function mergeRotation(
  stored: RotationState,
  rotation: { now: Date; graceUntil: Date; windowMs: number },
): RotationState {
  const { now, graceUntil, windowMs } = rotation;
  let cutoff = graceUntil;
  let rotatedAt = now;
  let revokedBefore = stored.tokensRevokedBefore;
  if (stored.rotatedAt !== null) {
    if (stored.rotatedAt > now) rotatedAt = stored.rotatedAt;
    if (
      stored.rotationGraceUntil !== null &&
      now.getTime() - stored.rotatedAt.getTime() < windowMs &&
      stored.rotationGraceUntil < cutoff
    )
      cutoff = stored.rotationGraceUntil;
    // A stored cut-off the new pair would end later (in force already: a revocation's, a
    // rotation's past its grace period; or still pending past `windowMs`) is kept for good
    // rather than dropped with the pair: the tokens it ends may have been issued with a longer
    // lifetime than `windowMs` counts (another instance's, or an earlier one's). A pending one
    // then ends them now, before its own end: fail closed, and only tokens longer-lived than
    // this instance issues are still alive then.
    if (
      (stored.rotationGraceUntil ?? stored.rotatedAt) < cutoff &&
      (revokedBefore === null || revokedBefore < stored.rotatedAt)
    )
      revokedBefore = stored.rotatedAt;
  }
  return { rotatedAt, rotationGraceUntil: cutoff, tokensRevokedBefore: revokedBefore };
}
