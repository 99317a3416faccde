import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { BearerVerifier } from "./authenticator.js";
import type { Awaitable } from "./awaitable.js";
import type { Principal } from "./principal.js";
import type { SharedDigest, VerifiedSecretCache } from "./secret-cache.js";

/**
 * One kind of bearer credential stored as a row with a PBKDF2 hash of its secret (personal
 * access tokens and API keys, machine tokens): how it is recognised, read, refused and
 * accepted. {@link storedSecretVerifier} runs these steps in the one order they share.
 */
export interface StoredSecretKind<P extends { secret: string }, S extends { secretHash: string }> {
  readonly name: string;
  /** The token's parts when it is of this kind (null: another verifier's). @throws TesseraError when malformed */
  ours(token: string): P | null;
  /** Its row: synchronously when the state cache keeps it (see SqlRunner.cachedGet). */
  read(presented: P): Awaitable<S | null>;
  /** Refuse a credential that may not authenticate now, before its secret is looked at. */
  assertUsable(found: S | null, state: RequestState, presented: NoInfer<P>): asserts found is S;
  /** The credential's namespace in the verified-secret cache. */
  namespace(found: S): string;
  /** The principal of a credential whose secret matched; marks the use. */
  accepted(found: S, state: RequestState): Principal;
  /** The refusal's message when the secret does not match (as for an unknown credential). */
  readonly unknown: string;
}

/**
 * The verifier of a {@link StoredSecretKind}: the cheap checks first (shape, one read,
 * state), so that nothing refused reaches PBKDF2, then the secret: accepted at once when the
 * verified-secret cache knows it (no promise: admission then decides the call without
 * awaiting, and needs no budget for it), else through the cache's verification.
 */
export function storedSecretVerifier<P extends { secret: string }, S extends { secretHash: string }>(
  secrets: Pick<VerifiedSecretCache, "verify" | "knows">,
  digests: { digestOf(found: S): string | null; sharedDigest(found: S): SharedDigest },
  kind: StoredSecretKind<P, S>,
): BearerVerifier {
  return {
    name: kind.name,
    verify(token, state) {
      const presented = kind.ours(token);
      if (presented === null) return null;
      const found = kind.read(presented);
      return found instanceof Promise
        ? found.then((row) => decide(row, presented, state))
        : decide(found, presented, state);
    },
  };

  /** The principal of the credential read as `found`, once its state and its secret allow it. */
  function decide(found: S | null, presented: P, state: RequestState): Awaitable<Principal> {
    kind.assertUsable(found, state, presented);
    const namespace = kind.namespace(found);
    if (secrets.knows(namespace, presented.secret, found.secretHash, digests.digestOf(found)))
      return kind.accepted(found, state);
    const shared = digests.sharedDigest(found);
    return secrets
      .verify(namespace, presented.secret, found.secretHash, shared, state.hashingRefused)
      .then((ok) => {
        if (!ok) throw new TesseraError("TOKEN_INVALID", kind.unknown);
        return kind.accepted(found, state);
      });
  }
}
