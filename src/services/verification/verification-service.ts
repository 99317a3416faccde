import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import {
  VerificationCode,
  type VerificationService,
  VerifiedPrincipalKind,
  type VerifyCredentialResponse,
  VerifyCredentialResponseSchema,
} from "../../../gen/tessera/v1/verification_service_pb.js";
import type { Principal } from "../../auth/principal.js";
import { isValidScope } from "../../auth/scopes.js";
import { requestState } from "../../context.js";
import { errors } from "../../errors.js";
import { frozenAnswer } from "../../transport/index.js";
import {
  CATCH_UP_MS,
  DEADLINE_MARGIN_MS,
  type RevocationCatchUp,
} from "../../verification/revocation-catch-up.js";
import {
  type CredentialVerifier,
  clientAddressOf,
  type Verification,
} from "../../verification/verify-credential.js";
import { principalOf } from "../common.js";
import { createWatchRevocations, type WatchRevocationsDeps } from "./watch-revocations.js";

/** At most this many required scopes per verification (a service asks for a few). */
const MAX_REQUIRED_SCOPES = 64;

/**
 * VerificationService: VerifyCredential for the platform's other backends, on the
 * verification core (src/verification/), which /oauth2/introspect shares; and
 * WatchRevocations, the revocation feed their caches follow (watch-revocations.ts).
 */
export function createVerificationService(deps: {
  verifier: CredentialVerifier;
  watch: WatchRevocationsDeps;
  /** What the instance's caches have applied of the feed (`min_revocation_position`). */
  catchUp: RevocationCatchUp;
}): ServiceImpl<typeof VerificationService> {
  const { catchUp } = deps;
  const verificationResponse = keptVerificationResponses();
  return {
    watchRevocations: createWatchRevocations(deps.watch),
    // Not async: a credential verified before is answered without a promise (see CredentialVerifier.verify).
    verifyCredential(req, ctx) {
      const caller = principalOf(ctx);
      if (req.requiredScopes.length > MAX_REQUIRED_SCOPES)
        throw errors.invalidArgument(`at most ${MAX_REQUIRED_SCOPES} required scopes`, "required_scopes");
      for (const s of req.requiredScopes)
        if (!isValidScope(s)) throw errors.invalidArgument(`invalid scope "${s}"`, "required_scopes");
      const input = {
        credential: req.credential,
        requiredScopes: req.requiredScopes,
        applicationId: req.applicationId,
        clientAddress: clientAddressOf(req.clientAddress),
      };
      const state = requestState(ctx.values);
      // The hot path when the caller's position is applied already: a kept cursor, found caught
      // up with in this epoch of the feed (nothing at all when the field is empty). A credential
      // of no shape Tessera issues is answered MALFORMED without catching up: no read, no flush.
      if (req.minRevocationPosition !== "") {
        const cursor = catchUp.behind(req.minRevocationPosition);
        if (cursor !== undefined && deps.verifier.wellFormed(input.credential))
          return catchUp
            .catchUp(cursor, catchUpBound(ctx.timeoutMs()))
            .then(() => deps.verifier.verify(caller, state, input))
            .then(verificationResponse);
      }
      const verification = deps.verifier.verify(caller, state, input);
      return verification instanceof Promise
        ? verification.then(verificationResponse)
        : verificationResponse(verification);
    },
  };
}

/**
 * How long a call may wait to catch up: {@link CATCH_UP_MS} at most, and
 * {@link DEADLINE_MARGIN_MS} less than what is left of the call's own deadline (its timeout
 * header), so that a caller that set one hears Unavailable before it gives up.
 */
function catchUpBound(remainingMs: number | undefined): number {
  if (remainingMs === undefined) return CATCH_UP_MS;
  return Math.max(0, Math.min(CATCH_UP_MS, remainingMs - DEADLINE_MARGIN_MS));
}

/**
 * {@link verificationResponse}, the same frozen answer for the same verdict on the same frozen
 * principal: a credential verified before gets the principal its verifier made from the frozen
 * rows it read (auth/token-verifier.ts, auth/user-principal.ts) until they change, and the
 * answer is a pure function of that principal and the verdict (nothing in it is per request),
 * so the transport encodes it once per encoding (transport/frozen-answers.ts). A verdict
 * without a principal, or with one not frozen, is answered anew each time.
 */
function keptVerificationResponses(): (v: Verification) => VerifyCredentialResponse {
  const made = new WeakMap<Principal, KeptVerification[]>();
  return (v) => {
    const p = v.principal;
    const lasting =
      p !== undefined &&
      Object.isFrozen(p) &&
      Object.isFrozen(p.scopes) &&
      (p.applicationIds === undefined || Object.isFrozen(p.applicationIds));
    if (!lasting) return verificationResponse(v);
    let kept = made.get(p);
    if (kept === undefined) {
      kept = [];
      made.set(p, kept);
    }
    for (const k of kept)
      if (
        k.valid === v.valid &&
        k.code === v.code &&
        k.credentialKind === v.credentialKind &&
        k.retryAfterSeconds === v.retryAfterSeconds
      )
        return k.answer;
    const answer = frozenAnswer(VerifyCredentialResponseSchema, verificationResponse(v));
    // A principal has a few verdicts at most (valid, insufficient scopes, not assigned): bounded.
    if (kept.length < KEPT_VERDICTS) kept.push({ ...v, answer });
    return answer;
  };
}

interface KeptVerification extends Verification {
  answer: VerifyCredentialResponse;
}

const KEPT_VERDICTS = 8;

/** The wire form of a verification. */
export function verificationResponse(v: Verification): VerifyCredentialResponse {
  const res = create(VerifyCredentialResponseSchema, {
    valid: v.valid,
    code: VerificationCode[v.code],
    retryAfterSeconds: v.retryAfterSeconds ?? 0,
  });
  const p = v.principal;
  if (p === undefined) return res;
  res.principalId = p.id;
  res.principalKind = p.kind === "user" ? VerifiedPrincipalKind.USER : VerifiedPrincipalKind.MACHINE_USER;
  res.tenantId = p.tenantId ?? "";
  res.scopes = [...p.scopes];
  if (p.expiresAt !== undefined && p.expiresAt !== null) res.expiresAt = timestampFromMs(p.expiresAt);
  res.certificateThumbprint = p.certificateBinding ?? "";
  res.credentialId = p.credentialId ?? "";
  res.credentialKind = v.credentialKind ?? "";
  res.applicationIds = [...(p.applicationIds ?? [])];
  return res;
}
