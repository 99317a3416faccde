import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { PresentedCredential } from "./credentials.js";
import type { AccessTokenClaims, JwtService } from "./jwt.js";
import { type PeerCertificateInfo, type Principal, walledOff } from "./principal.js";

/**
 * Verifies one shape of bearer token (JWT, a prefixed opaque token, the admin token).
 * Returns null when the token is not of its shape, so the next verifier can try;
 * throws TesseraError when the token is of its shape but not acceptable.
 */
export interface BearerVerifier {
  readonly name: string;
  verify(token: string, state: RequestState): Promise<Principal | null>;
  /**
   * The refusal `verify` would throw for `token`, when it is known without any work (a
   * token this verifier already found forged), else undefined. Synchronous, so that a
   * replayed bad token is refused without a chain of async frames rethrowing it.
   */
  knownRefusal?(token: string): TesseraError | undefined;
  /**
   * What `verify` would answer, when this verifier can tell without I/O or awaiting (a
   * JWT it verified before whose subject's row is read synchronously): the principal, or
   * null when the token is not of its shape. Undefined when it cannot tell now, and the
   * caller goes on with `verify`. Throws the refusals `verify` would.
   */
  verifyNow?(token: string, state: RequestState): Principal | null | undefined;
}

/** Verifies Basic credentials; null when the username is not one it knows. */
export interface BasicVerifier {
  readonly name: string;
  verify(username: string, password: string, state: RequestState): Promise<Principal | null>;
}

/** Maps a verified client certificate (with no header credential) to a principal, or null. */
export interface CertificateVerifier {
  readonly name: string;
  verify(certificate: PeerCertificateInfo, state: RequestState): Promise<Principal | null>;
}

/** Turns verified access-token claims into a principal by reading the subject's current state. */
export interface ClaimsLoader {
  (claims: AccessTokenClaims, state: RequestState): Promise<Principal>;
  /**
   * The same, when the subject's state can be read synchronously (SQLite); undefined when
   * it cannot, and the caller awaits the loader instead.
   */
  now?(claims: AccessTokenClaims, state: RequestState): Principal | undefined;
}

/**
 * The verifiers admission consults (src/admission/). Features register theirs at
 * start-up (tokens, machine users, certificates); order matters only between verifiers
 * whose shapes could overlap, and none do.
 */
export class Authenticator {
  readonly bearer: BearerVerifier[] = [];
  readonly basic: BasicVerifier[] = [];
  readonly certificate: CertificateVerifier[] = [];

  /**
   * The refusal `authenticate` would throw for `credential`, when a verifier already knows
   * it (see `BearerVerifier.knownRefusal`), else undefined: no I/O, no promise. A token a
   * verifier remembers refusing was declined by the verifiers before it (their answers for
   * a token do not change), so its refusal stands without asking them again.
   */
  knownRefusal(credential: PresentedCredential): TesseraError | undefined {
    if (credential.type === "basic") return undefined;
    for (const v of this.bearer) {
      const known = v.knownRefusal?.(credential.token);
      if (known) return known;
    }
    return undefined;
  }

  /**
   * What `authenticate` would answer for a bearer credential, when the verifiers can tell
   * without I/O or awaiting (see `BearerVerifier.verifyNow`): the principal. When they
   * cannot (and for Basic), the index of the first verifier that could not tell, for the
   * caller to go on with `authenticate` from there: the verifiers before it declined the
   * token already (the static admin token's hash is not computed twice).
   *
   * Why: an accepted call with a token seen before is the common case, and each async
   * frame of `authenticate` (verifier, claims loader, row read) costs a promise and a
   * microtask turn; profiled, that chain was several percent of such a call.
   * @throws TesseraError the refusals `authenticate` would throw
   */
  authenticateNow(credential: PresentedCredential, state: RequestState): Principal | number {
    if (credential.type === "basic") return 0;
    for (let i = 0; i < this.bearer.length; i++) {
      const p = this.bearer[i]!.verifyNow?.(credential.token, state);
      if (p === undefined) return i;
      if (p !== null) return p;
    }
    throw new TesseraError("TOKEN_INVALID", "token is not recognised");
  }

  /**
   * Authenticate a presented credential, or the connection's certificate when none was sent.
   * `from`: the first bearer verifier to ask (see `authenticateNow`).
   */
  async authenticate(
    credential: PresentedCredential | null,
    state: RequestState,
    from = 0,
  ): Promise<Principal | null> {
    if (credential === null) {
      if (!state.certificate) return null;
      for (const v of this.certificate) {
        const p = await v.verify(state.certificate, state);
        if (p) return p;
      }
      return null;
    }
    if (credential.type === "basic") {
      for (const v of this.basic) {
        const p = await v.verify(credential.username, credential.password, state);
        if (p) return p;
      }
      throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
    }
    for (let i = from; i < this.bearer.length; i++) {
      const p = await this.bearer[i]!.verify(credential.token, state);
      if (p) return p;
    }
    throw new TesseraError("TOKEN_INVALID", "token is not recognised");
  }
}

const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;
/** What a token whose signature already failed is refused with: one error, made once (it carries no stack). */
const FORGED = new TesseraError("TOKEN_INVALID", "access token is invalid");

/**
 * Bearer verifier for Tessera-issued access tokens. After the signature (cached per
 * token), the subject's current state is read on every request, so a disabled or deleted
 * subject is refused at once; a certificate-bound token (cnf x5t#S256) is accepted only
 * on a connection presenting that same certificate (RFC 8705).
 */
export function createJwtBearerVerifier(
  jwt: JwtService,
  loaders: Partial<Record<"user" | "machine", ClaimsLoader>>,
): BearerVerifier {
  return {
    name: "jwt",
    knownRefusal(token) {
      return jwt.isForged(token) ? FORGED : undefined;
    },
    verifyNow(token, state) {
      if (state.tenantWall !== undefined) {
        if (!JWT_SHAPE.test(token)) return null;
        assertInsideWall(token, state);
      }
      const claims = jwt.verifiedClaims(token);
      if (claims !== undefined) return loaderFor(claims, state).now?.(claims, state);
      // Not of the shape: `verify` would answer null, so the verifiers after this one
      // (opaque tokens) may decide now too.
      return JWT_SHAPE.test(token) ? undefined : null;
    },
    async verify(token, state) {
      if (state.tenantWall !== undefined) {
        if (!JWT_SHAPE.test(token)) return null;
        assertInsideWall(token, state);
      }
      // A token verified before is of the shape: the cache is asked first, with no regex
      // over the token and no await.
      let claims = jwt.verifiedClaims(token);
      if (claims === undefined) {
        if (!JWT_SHAPE.test(token)) return null;
        claims = await jwt.verify(token);
      }
      return loaderFor(claims, state)(claims, state);
    },
  };

  /**
   * Behind a verification's tenant wall, the tenant the token names decides before anything
   * else: its signature, its expiry and its subject's state would each tell another
   * tenant's token from one that does not exist (an expired one answered EXPIRED). The
   * claim is read unverified, which reveals nothing: anyone can decode it, and a forged
   * token naming the caller's tenant is still refused by the signature.
   */
  function assertInsideWall(token: string, state: RequestState): void {
    if (walledOff(state, claimedTenant(token))) throw FORGED;
  }

  /** The loader of the verified token's subject, once the token's certificate binding holds. */
  function loaderFor(claims: AccessTokenClaims, state: RequestState): ClaimsLoader {
    // The verified claim, which `assertInsideWall` read unverified from the same payload.
    if (walledOff(state, claims.tid)) throw FORGED;
    const bound = claims.cnf?.["x5t#S256"];
    if (bound !== undefined && state.certificate?.thumbprint !== bound) {
      throw new TesseraError(
        "TOKEN_NOT_BOUND",
        "token is bound to a client certificate this connection did not present",
      );
    }
    const loader = loaders[claims.pk];
    if (!loader) throw new TesseraError("TOKEN_INVALID", "token subject kind is not accepted");
    return loader;
  }
}

/** The `tid` claim of a token of the JWT shape, unverified; "" when it has none (no tenant's, so walled off). */
function claimedTenant(token: string): string {
  const start = token.indexOf(".") + 1;
  try {
    const payload: unknown = JSON.parse(
      Buffer.from(token.slice(start, token.indexOf(".", start)), "base64url").toString("utf8"),
    );
    const tid = typeof payload === "object" && payload !== null ? (payload as { tid?: unknown }).tid : "";
    return typeof tid === "string" ? tid : "";
  } catch {
    return "";
  }
}
