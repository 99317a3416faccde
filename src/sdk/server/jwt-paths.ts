// Which way a JWT presented downstream is verified: offline (the JWKS) or by Tessera's
// VerifyCredential, and, offline, whether the revocation watch lets the verdict stand.
// Apart from the core (tessera-auth.ts) so that file stays one concept: deciding who is calling.

import type { AccessTokenClaims, JwtAlgorithm } from "./offline-jwt.js";
import type { RevocationWatch } from "./revocation-watch.js";
import { certificateAuthority } from "./token-claims.js";

/**
 * How JWTs are verified: "offline" against Tessera's JWKS only (a token signed otherwise is
 * refused); "online" by Tessera's VerifyCredential, as an opaque credential; "auto" decided
 * by the deployment, not by the token: offline while the JWKS holds a key the allowlist
 * accepts, by Tessera when it holds none (HS256: a shared secret publishes no key).
 */
export type JwtVerifyMode = "offline" | "online" | "auto";

/** The `alg` a JWT's header names, read only to route the token: nothing in it is trusted. */
function headerAlg(token: string): unknown {
  try {
    const header: unknown = JSON.parse(
      Buffer.from(token.slice(0, token.indexOf(".")), "base64url").toString(),
    );
    return typeof header === "object" && header !== null ? (header as { alg?: unknown }).alg : undefined;
  } catch {
    return undefined;
  }
}

/** The algorithms Tessera signs access tokens with (`auth.jwt.algorithm`, or HS256 with `auth.jwt.secret`). */
const TESSERA_ALGORITHMS: readonly string[] = ["EdDSA", "ES256", "HS256"];

/**
 * Whether `token` (of a JWT's shape) is verified by Tessera rather than offline. In "auto",
 * a token goes to Tessera only when the deployment publishes no key the offline allowlist
 * accepts (`keyless`: the JWKS, fetched as for an offline token; HS256 publishes none) and
 * its header names an algorithm Tessera signs with that the allowlist lacks. The header is
 * the caller's to write, so it never decides alone: on a deployment with keys, an HS256
 * token is refused offline and a forged one spends no VerifyCredential call, nor the
 * service's failure budget at Tessera; `none`, RS256 or garbage are refused on any deployment.
 */
export async function verifiesOnline(
  token: string,
  mode: JwtVerifyMode,
  offline: readonly JwtAlgorithm[],
  keyless: () => Promise<boolean>,
): Promise<boolean> {
  if (mode !== "auto") return mode === "online";
  const alg = headerAlg(token);
  if (typeof alg !== "string" || !TESSERA_ALGORITHMS.includes(alg)) return false;
  return !(offline as readonly string[]).includes(alg) && (await keyless());
}

/** What the core reads of a credential it asks Tessera about (see {@link onlinePayload}). */
export interface AskedClaims {
  exact: boolean;
  sid: string | undefined;
}

/** The same of an access token verified offline (none for an opaque credential). */
export function offlinePayload(claims: AccessTokenClaims | undefined): AskedClaims {
  return { exact: claims !== undefined && certificateAuthority(claims), sid: claims?.sid };
}

/**
 * What the core reads of a JWT it sends to Tessera, from one decoding of its payload:
 * `exact`, whether its authority came from a client certificate (see certificateAuthority:
 * then no answer for it is shared or cached), and its session (`sid`), which counts only once
 * Tessera has answered VALID for this very token (Tessera checked its signature, so the
 * payload is Tessera's own): the `sid` keys the cached answer to the session's revocation
 * events (logout, session revoked).
 */
export function onlinePayload(token: string): AskedClaims {
  try {
    const payload: unknown = JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString());
    if (typeof payload !== "object" || payload === null) return { exact: false, sid: undefined };
    const sid = (payload as { sid?: unknown }).sid;
    return {
      exact: certificateAuthority(payload),
      sid: typeof sid === "string" && sid !== "" ? sid : undefined,
    };
  } catch {
    return { exact: false, sid: undefined };
  }
}

/** What {@link offlineVerdict} reads of the core. */
export interface OfflineVerdictDeps {
  watch: RevocationWatch | undefined;
  /** Tenants whose revocations the stream carries (see tessera-auth.ts). */
  walled: ReadonlySet<string>;
  skewMs: number;
  maxLifetimeMs: number;
  now: () => number;
}

/**
 * Whether an offline-verified token may be admitted without asking Tessera. A user's token
 * without `sid` is refused as Tessera refuses it (an ended session's): every one Tessera
 * mints names its session, so only a leaked signing key makes one, and no session
 * revocation would ever end it. A machine user's token (`pk` "machine") has no session.
 */
export function offlineVerdict(
  claims: AccessTokenClaims,
  deps: OfflineVerdictDeps,
): "accept" | "ask" | "revoked" {
  if (claims.pk === "user" && !claims.sid) return "revoked";
  const { watch, skewMs } = deps;
  if (!watch?.healthy() || !deps.walled.has(claims.tid)) return "ask";
  const issued = claims.iat * 1000;
  if (issued < watch.coverageSince || deps.now() - issued > deps.maxLifetimeMs) return "ask";
  let verdict: "accept" | "ask" = "accept";
  const ids: [Parameters<RevocationWatch["revokedAt"]>[0], string | undefined][] = [
    ["credential", claims.jti],
    ["session", claims.sid],
    ["subject", claims.sub],
    ["tenant", claims.tid],
  ];
  for (const [target, id] of ids) {
    if (id === undefined) continue;
    const at = watch.revokedAt(target, id);
    if (at === undefined) continue;
    if (at + skewMs < issued) continue; // issued after the event
    // A session or credential ended before the token was issued (`iat` is whole seconds,
    // and clocks differ): final. A subject or tenant changed since may still hold the
    // token valid (fewer scopes, re-enabled): Tessera decides, and its answer is cached.
    if ((target === "session" || target === "credential") && at > issued + 1000 + skewMs) return "revoked";
    verdict = "ask";
  }
  return verdict;
}
