import { createHash, timingSafeEqual } from "node:crypto";
import type { RequestState } from "../context.js";
import type { BearerVerifier } from "./authenticator.js";
import type { Principal } from "./principal.js";

/** Id of the static admin token principal (it has no row anywhere). */
export const ADMIN_TOKEN_PRINCIPAL_ID = "admin-token";

/** The configuration refuses shorter tokens (admin.token / TESSERA_ADMIN_TOKEN). */
export const ADMIN_TOKEN_MIN_LENGTH = 32;

function sha256(value: string): Buffer {
  return createHash("sha256").update(value, "utf8").digest();
}

/**
 * Bearer verifier for the static admin token (seed 003). Both sides are hashed with
 * SHA-256 and compared with `crypto.timingSafeEqual`: the digests always have the same
 * length, so a token of any length is handled, and the time taken says nothing about
 * how much of it matched. A match is a superuser principal (scope `*`, no tenant); any
 * other token is not ours (null), so the remaining verifiers decide.
 *
 * Registered first in the bearer chain: it is one hash, cheaper than any other check.
 */
export function createAdminTokenVerifier(token: string): BearerVerifier {
  if (token.length < ADMIN_TOKEN_MIN_LENGTH) {
    throw new Error(
      `admin.token (TESSERA_ADMIN_TOKEN) must be at least ${ADMIN_TOKEN_MIN_LENGTH} characters`,
    );
  }
  const expected = sha256(token);
  return {
    name: "admin-token",
    verify: principalOf,
  };

  function principalOf(presented: string, state: RequestState): Principal | null {
    if (!timingSafeEqual(sha256(presented), expected)) return null;
    return {
      kind: "admin",
      method: "admin_token",
      id: ADMIN_TOKEN_PRINCIPAL_ID,
      tenantId: null,
      scopes: ["*"],
      certificate: state.certificate,
    };
  }
}
