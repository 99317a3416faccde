import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { BearerVerifier } from "./authenticator.js";
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
  /** Its row read synchronously where the store allows it (SQLite); undefined where it does not. */
  readNow(presented: P): S | null | undefined;
  read(presented: P): Promise<S | null>;
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
 * state), so that nothing refused reaches PBKDF2, then the secret through the
 * verified-secret cache. `verifyNow` is the same steps without a promise, for a secret
 * the cache knows and a row read synchronously: admission then needs no no-hashing scope
 * for it; anything else is undefined, and `verify`.
 */
export function storedSecretVerifier<P extends { secret: string }, S extends { secretHash: string }>(
  secrets: Pick<VerifiedSecretCache, "verify" | "knows">,
  digests: { digestOf(found: S): string | null; sharedDigest(found: S): SharedDigest },
  kind: StoredSecretKind<P, S>,
): BearerVerifier {
  return {
    name: kind.name,
    verifyNow(token, state) {
      const presented = kind.ours(token);
      if (presented === null) return null;
      const found = kind.readNow(presented);
      if (found === undefined) return undefined;
      kind.assertUsable(found, state, presented);
      if (!secrets.knows(kind.namespace(found), presented.secret, found.secretHash, digests.digestOf(found)))
        return undefined;
      return kind.accepted(found, state);
    },
    async verify(token, state) {
      const presented = kind.ours(token);
      if (presented === null) return null;
      const found = await kind.read(presented);
      kind.assertUsable(found, state, presented);
      const shared = digests.sharedDigest(found);
      if (!(await secrets.verify(kind.namespace(found), presented.secret, found.secretHash, shared)))
        throw new TesseraError("TOKEN_INVALID", kind.unknown);
      return kind.accepted(found, state);
    },
  };
}
