import type { RequestState } from "../context.js";
import { TesseraError } from "../errors.js";
import type { Awaitable } from "./awaitable.js";
import type { PresentedCredential } from "./credentials.js";
import type { AccessTokenClaims, JwtService } from "./jwt.js";
import { type PeerCertificateInfo, type Principal, walledOff } from "./principal.js";

/**
 * Verifies one shape of bearer token (JWT, a prefixed opaque token, the admin token).
 * Answers null when the token is not of its shape, so the next verifier can try; refuses
 * (throws or rejects with a TesseraError) when the token is of its shape but not
 * acceptable. Answers synchronously when it needs no I/O (a token verified before whose
 * subject's row the state cache keeps), else with a promise: see awaitable.ts.
 */
export interface BearerVerifier {
  readonly name: string;
  verify(token: string, state: RequestState): Awaitable<Principal | null>;
  /**
   * The refusal `verify` would give `token`, when it is known without any work (a token
   * this verifier already found forged), else undefined: a cache answer, so that a replayed
   * bad token is refused without a throw.
   */
  knownRefusal?(token: string): TesseraError | undefined;
  /**
   * Whether `token` is a JWT this verifier verified before and still keeps: a cache answer,
   * no work, that spares a caller the test of the token's shape.
   */
  knownJwt?(token: string): boolean;
}

/** Verifies Basic credentials; null when the username is not one it knows. */
export interface BasicVerifier {
  readonly name: string;
  verify(username: string, password: string, state: RequestState): Awaitable<Principal | null>;
}

/** Maps a verified client certificate (with no header credential) to a principal, or null. */
export interface CertificateVerifier {
  readonly name: string;
  verify(certificate: PeerCertificateInfo, state: RequestState): Awaitable<Principal | null>;
}

/** Turns verified access-token claims into a principal by reading the subject's current state. */
export type ClaimsLoader = (claims: AccessTokenClaims, state: RequestState) => Awaitable<Principal>;

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
   * The refusal `authenticate` would give `credential`, when a verifier already knows it
   * (see `BearerVerifier.knownRefusal`), else undefined: no I/O, no promise. A token a
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

  /** Whether a bearer verifier keeps `token` as a JWT it verified (see `BearerVerifier.knownJwt`). */
  isKnownJwt(token: string): boolean {
    for (const v of this.bearer) if (v.knownJwt?.(token) === true) return true;
    return false;
  }

  /**
   * Authenticate a presented credential, or the connection's certificate when none was
   * sent: the first verifier's principal, asked in order. Synchronous when every verifier
   * asked answers without I/O; a refusal is thrown then, and rejected otherwise (callers
   * treat both alike: `settle` of awaitable.ts).
   */
  authenticate(credential: PresentedCredential | null, state: RequestState): Awaitable<Principal | null> {
    if (credential === null) {
      const certificate = state.certificate;
      if (!certificate) return null;
      return firstPrincipal(this.certificate, 0, (v) => v.verify(certificate, state), noPrincipal);
    }
    if (credential.type === "basic") {
      const { username, password } = credential;
      return firstPrincipal(this.basic, 0, (v) => v.verify(username, password, state), badPassword);
    }
    return this.bearerFrom(0, credential.token, state);
  }

  /**
   * The bearer verifiers from `i` on. Not {@link firstPrincipal}: this is every
   * authenticated call's path, and it allocates nothing while the verifiers answer now.
   */
  private bearerFrom(i: number, token: string, state: RequestState): Awaitable<Principal | null> {
    for (; i < this.bearer.length; i++) {
      const p = this.bearer[i]!.verify(token, state);
      if (p instanceof Promise) {
        const next = i + 1;
        return p.then((found) => found ?? this.bearerFrom(next, token, state));
      }
      if (p !== null) return p;
    }
    throw new TesseraError("TOKEN_INVALID", "token is not recognised");
  }
}

/** The first principal `ask` gets from `verifiers`, from index `i` on; else `none()`. */
function firstPrincipal<V>(
  verifiers: readonly V[],
  i: number,
  ask: (verifier: V) => Awaitable<Principal | null>,
  none: () => Principal | null,
): Awaitable<Principal | null> {
  for (; i < verifiers.length; i++) {
    const p = ask(verifiers[i]!);
    if (p instanceof Promise) {
      const next = i + 1;
      return p.then((found) => found ?? firstPrincipal(verifiers, next, ask, none));
    }
    if (p !== null) return p;
  }
  return none();
}

const noPrincipal = () => null;
const badPassword = (): never => {
  throw new TesseraError("CREDENTIALS_INVALID", "invalid username or password");
};

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
    knownJwt(token) {
      return jwt.isVerified(token);
    },
    verify(token, state) {
      if (state.tenantWall !== undefined) {
        if (!JWT_SHAPE.test(token)) return null;
        assertInsideWall(token, state);
      }
      // A token verified before is of the shape: the cache is asked first, with no regex
      // over the token, and its subject's row read without a promise when the state cache
      // keeps it.
      const claims = jwt.verifiedClaims(token);
      if (claims !== undefined) return loaderFor(claims, state)(claims, state);
      if (!JWT_SHAPE.test(token)) return null;
      return jwt.verify(token).then((verified) => loaderFor(verified, state)(verified, state));
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
