// The core shared by the Connect interceptor and the Node middleware: who is calling, from
// the Authorization header (and the client certificate), and whether a rule admits them.

import {
  VerificationCode,
  type VerifyCredentialResponse,
} from "../../../gen/tessera/v1/verification_service_pb.js";
import { defaultLogger } from "../logger.js";
import { loadClientTls } from "../tls.js";
import { AdmissionMemo } from "./admission-memo.js";
import { createAuthReports } from "./auth-reports.js";
import { refusalOf, TesseraAuthError } from "./errors.js";
import { fetchJson } from "./fetch-json.js";
import { offlinePayload, offlineVerdict, onlinePayload, verifiesOnline } from "./jwt-paths.js";
import {
  type AccessTokenClaims,
  createOfflineJwtVerifier,
  JWT_ALGORITHMS,
  looksLikeJwt,
  type OfflineJwtVerifier,
} from "./offline-jwt.js";
import { principalOfAnswer, principalOfClaims, type TesseraPrincipal } from "./principal.js";
import { RevocationWatch } from "./revocation-watch.js";
import { RECHECK_MS, type StreamHold, StreamHolds } from "./stream-holds.js";
import type { TesseraAuthOptions, TesseraAuthStats } from "./tessera-auth-options.js";
import { createTesseraClient } from "./tessera-client.js";
import { certificateAuthority } from "./token-claims.js";
import { authorize, credentialOf, type DownstreamRule, REFUSALS, unavailable } from "./verdicts.js";
import { VerifiedCache } from "./verified-cache.js";
import { type SlotWait, VerifyFlights } from "./verify-flights.js";

export type { TesseraAuthOptions, TesseraAuthStats } from "./tessera-auth-options.js";

/** The shared core: authenticate a call, authorize it against a rule. */
export interface TesseraAuth {
  /**
   * The principal behind an `Authorization` header value, with the connection's verified
   * client certificate thumbprint (for bound credentials) and the client's address (sent to
   * VerifyCredential, so that a client sending bad credentials spends a budget of its own
   * there, not the whole service's). @throws TesseraAuthError
   */
  authenticate(
    authorization: string | undefined,
    certificateThumbprint?: string,
    clientAddress?: string,
  ): Promise<TesseraPrincipal>;
  /**
   * The principal of a header admitted before and still vouched for (an access token
   * verified offline, or an opaque credential whose answer the cache holds while the watch
   * is up), synchronously; undefined in every other case, the refusals included: then call
   * {@link authenticate}, which decides (and throws). Lets a hit skip the promise.
   */
  admitted(authorization: string | undefined, certificateThumbprint?: string): TesseraPrincipal | undefined;
  /** @throws TesseraAuthError ACCESS_DENIED or PRINCIPAL_NOT_ALLOWED */
  authorize(principal: TesseraPrincipal, rule: DownstreamRule): void;
  /**
   * Report a failure outside {@link authenticate} (a bug, of the SDK or of what it was given:
   * see `refusalOf`) to the logger, aggregated, its message left out. The interceptor and the
   * middleware answer such a call INTERNAL.
   */
  reportBug(err: unknown): void;
  /**
   * Admit a streaming call (authenticate, authorize) and keep its admission alive while it
   * runs: the hold's signal is aborted with the refusal a new call would get (see
   * StreamHolds), past `certificateEnd` (the certificate's notAfter, epoch ms) too, without
   * the certificate. Release the hold when the stream ends. @throws TesseraAuthError
   */
  holdStream(
    authorization: string | undefined,
    certificateThumbprint: string | undefined,
    rule: DownstreamRule,
    clientAddress?: string,
    certificateEnd?: number,
  ): Promise<StreamHold>;
  /** Whether the revocation stream is up (the cache is in use). */
  watching(): boolean;
  /** Resolves when the revocation stream is up, false after `timeoutMs` without. */
  ready(timeoutMs?: number): Promise<boolean>;
  stats(): TesseraAuthStats;
  close(): void;
}

/** Admissions remembered by their Authorization header (see AdmissionMemo). */
const MEMO_MAX = 10_000;

/** A credential admitted: remembered until `until` (0: not at all) while the watch's epoch stays. */
interface Admitted {
  principal: TesseraPrincipal;
  epoch: number;
  until: number;
  offline: boolean;
  /** Answered by Tessera: the key of its answer in the cache. */
  credential?: string;
}

/**
 * Create the core. Access tokens are verified offline (JWKS) where the deployment publishes
 * keys (see `jwt.verify`); personal access tokens, API keys, machine tokens, Basic pairs and
 * the access tokens of an HS256 Tessera through Tessera's VerifyCredential, whose VALID
 * answers are cached while the WatchRevocations stream is up (each event drops what it
 * names), except for an access token whose authority came from a client certificate:
 * Tessera answers that one on every call. While the stream is down (not yet connected,
 * broken, silent past twice its heartbeat) the cache is empty and every call is verified by
 * Tessera, access tokens included.
 * Tessera unreachable: UNAVAILABLE (503 + Retry-After), never an admission.
 */
export function createTesseraAuth(options: TesseraAuthOptions): TesseraAuth {
  const now = options.now ?? Date.now;
  const skewMs = (options.clockSkewSeconds ?? 30) * 1000;
  const maxLifetimeMs = (options.maxTokenLifetimeSeconds ?? 86_400) * 1000;
  const verifyTimeoutMs = options.verifyTimeoutMs ?? 2000;
  const base = options.server.replace(/\/+$/, "");
  const tls = loadClientTls({ certFolder: options.certFolder, caFile: options.caFile });
  const logger = options.logger ?? defaultLogger;
  const reports = createAuthReports(logger, now);
  const tessera = createTesseraClient({
    onFault: reports.verifyFault,
    base,
    tls,
    transport: options.transport,
    credential: options.credential,
    verifyTimeoutMs,
  });

  const cacheOptions = options.cache === false ? { max: 0, ttlSeconds: 0 } : (options.cache ?? {});
  const cache = new VerifiedCache({
    max: cacheOptions.max ?? 10_000,
    ttlMs: (cacheOptions.ttlSeconds ?? 300) * 1000,
    now,
  });
  const counters = { cacheHits: 0, verifyCalls: 0, offlineJwts: 0 };

  const algorithms = options.algorithms ?? JWT_ALGORITHMS;
  const jwtMode = options.jwt?.verify ?? "auto";
  let jwksUri = options.jwksUri;
  const getJson = options.fetchJson ?? ((url: string) => fetchJson(url, tls));
  const jwt: OfflineJwtVerifier = createOfflineJwtVerifier({
    async fetchJwks() {
      if (jwksUri === undefined) {
        try {
          const doc = (await getJson(`${base}/.well-known/oauth-authorization-server`)) as {
            jwks_uri?: unknown;
          };
          jwksUri = typeof doc.jwks_uri === "string" ? doc.jwks_uri : `${base}/.well-known/jwks.json`;
        } catch {
          return getJson(`${base}/.well-known/jwks.json`);
        }
      }
      return getJson(jwksUri);
    },
    issuer: options.issuer ?? "tessera",
    audience: options.audience ?? "tessera",
    algorithms,
    clockSkewSeconds: skewMs / 1000,
    refetchGapMs: options.jwksRefetchGapMs ?? 30_000,
    maxAgeMs: options.jwksMaxAgeMs ?? 300_000,
    now,
    onFetched: reports.jwksFetched,
  });

  /**
   * The tenants whose revocations this service's stream carries, as Tessera has shown them:
   * those of its VALID answers. VerifyCredential and WatchRevocations share one tenant wall
   * (the caller's tenant, or every tenant for `*`), so a tenant Tessera answered VALID for
   * is one whose events the stream delivers. An access token of any other tenant is not
   * admitted offline: Tessera answers it (as unknown, behind the wall), and its revocations
   * would never reach this service.
   */
  const walled = new Set<string>();

  /** Principals of certificate-authority tokens: the watch never vouches for them (see online). */
  const exactPrincipals = new WeakSet<TesseraPrincipal>();
  const streams = new StreamHolds({
    authenticate,
    watching: () => watch?.healthy() ?? false,
    exact: (principal) => exactPrincipals.has(principal),
    now,
    refusalOf: (err) => refusalOf(err, reports.bug),
  });

  const watch =
    options.watch === false
      ? undefined
      : new RevocationWatch({
          open: tessera.openWatch,
          now,
          logger,
          skewMs,
          rememberMs: maxLifetimeMs,
          onEvent: (target, id) => {
            cache.invalidate(target, id);
            streams.onEvent(target, id);
          },
          onLost: () => {
            cache.clear();
            walled.clear();
            streams.onLost();
          },
          ...(options.watchBackoffMs
            ? { minBackoffMs: options.watchBackoffMs.min, maxBackoffMs: options.watchBackoffMs.max }
            : {}),
        });

  const verdictDeps = { watch, walled, skewMs, maxLifetimeMs, now };

  // A held stream's re-check waits for a slot as long as a stream nothing vouches for runs
  // between checks anyway (see StreamHolds); a new call never waits.
  const inflight = new VerifyFlights<VerifyCredentialResponse>(
    options.maxConcurrentVerifications ?? 1024,
    (why) => {
      if (why === "waited") reports.recheckRefused();
      else reports.verifyRefused();
      return unavailable("too many credentials are being verified at once");
    },
    RECHECK_MS,
  );

  /**
   * Tessera's answer for `credential`, from the cache while the stream vouches for it; with
   * the watch's epoch and the cache's deadline when the answer is (now) cached, else `until` 0.
   * A certificate-authority token's (see certificateAuthority) is asked on every call, never
   * cached: the cache is read before its claims, as it never holds one.
   */
  async function online(
    credential: string,
    address: string | undefined,
    wait: SlotWait | undefined,
    jwtOnline = false,
    claims?: AccessTokenClaims,
  ): Promise<Admitted> {
    const trusted = watch?.healthy() ?? false;
    if (!trusted) cache.clear();
    else {
      const hit = cache.get(credential);
      if (hit) {
        counters.cacheHits++;
        return {
          principal: hit,
          epoch: watch!.epoch,
          until: cache.until(credential),
          offline: false,
          credential,
        };
      }
    }
    const { exact, sid } = jwtOnline ? onlinePayload(credential) : offlinePayload(claims);
    const epoch = watch?.epoch ?? 0;
    // Concurrent first uses of one credential share one answer, whichever client sent each.
    // A certificate-authority token's binding changes without an event: no call joins an ask
    // made before it began, yet one ask at a time (the calls meanwhile share the next one).
    const res = await inflight.answer(
      credential,
      epoch,
      () => {
        counters.verifyCalls++;
        return tessera.verify(credential, address, watch?.position);
      },
      wait,
      exact,
    );
    if (res.code === VerificationCode.RATE_LIMITED)
      throw new TesseraAuthError("RATE_LIMITED", "too many failed verifications: retry later", {
        retryAfterSeconds: Math.max(1, res.retryAfterSeconds),
      });
    if (!res.valid) {
      const [reason, message] = REFUSALS[res.code] ?? ["CREDENTIALS_INVALID", "credentials are invalid"];
      throw new TesseraAuthError(reason, message);
    }
    const principal = principalOfAnswer(res, sid);
    if (res.tenantId !== "") walled.add(res.tenantId);
    if (exact) exactPrincipals.add(principal);
    // Stored only when no event and no loss of the stream came in while Tessera answered.
    const until =
      !exact && trusted && watch?.healthy() && watch.epoch === epoch ? cache.set(credential, principal) : 0;
    return { principal, epoch, until, offline: false, credential };
  }

  const keyless = async () => !(await jwt.hasKeys());

  /** The full path: the header parsed, the credential verified (offline, cached, or by Tessera). */
  async function admit(
    authorization: string | undefined,
    address: string | undefined,
    wait: SlotWait | undefined,
  ): Promise<Admitted> {
    const credential = credentialOf(authorization);
    if (!looksLikeJwt(credential)) return online(credential, address, wait);
    // Verified by Tessera exactly as an opaque credential: its claims are never trusted here.
    if (await verifiesOnline(credential, jwtMode, algorithms, keyless))
      return online(credential, address, wait, true);
    const claims = await jwt.verify(credential);
    const verdict = offlineVerdict(claims, verdictDeps);
    if (verdict === "revoked") throw new TesseraAuthError("TOKEN_REVOKED", "credential is revoked");
    // Only Tessera knows whether a certificate-authority token's certificate is still its own.
    if (verdict === "ask" || certificateAuthority(claims))
      return online(credential, address, wait, false, claims);
    counters.offlineJwts++;
    // Accepted while the watch is healthy; offlineVerdict asks again past the lifetime bound.
    const until = Math.min(claims.exp * 1000, claims.iat * 1000 + maxLifetimeMs);
    return { principal: principalOfClaims(claims), epoch: watch!.epoch, until, offline: true };
  }

  const memo = new AdmissionMemo(watch ? MEMO_MAX : 0);

  /** The synchronous hit: see TesseraAuth.admitted. */
  function admitted(
    authorization: string | undefined,
    certificateThumbprint?: string,
  ): TesseraPrincipal | undefined {
    if (authorization === undefined || watch === undefined) return undefined;
    const t = now();
    if (!watch.healthy(t)) return undefined;
    const known = memo.get(authorization, watch.epoch, jwt.keySet, t);
    if (known === undefined) return undefined;
    const principal = known.principal;
    // Tessera's answer counts while its cache holds it (bound, age, least recently used).
    if (!known.offline && cache.get(known.credential!) !== principal) return undefined;
    // A bound credential on a call without its certificate: authenticate refuses it.
    if (
      principal.certificateThumbprint !== undefined &&
      principal.certificateThumbprint !== certificateThumbprint
    )
      return undefined;
    if (known.offline) counters.offlineJwts++;
    else counters.cacheHits++;
    return principal;
  }

  /** TesseraAuth.authenticate; `wait`: a held stream's re-check, which may wait for a slot (see StreamHolds). */
  async function authenticate(
    authorization: string | undefined,
    certificateThumbprint?: string,
    clientAddress?: string,
    wait?: SlotWait,
  ): Promise<TesseraPrincipal> {
    const hit = admitted(authorization, certificateThumbprint);
    if (hit !== undefined) return hit;
    const keySet = jwt.keySet;
    let fresh: Admitted;
    try {
      fresh = await admit(authorization, clientAddress, wait);
    } catch (err) {
      if (err instanceof TesseraAuthError) throw err;
      // A fault of the check (503, reported): made a TesseraAuthError so that what calls
      // this tells it from a failure of its own (a bug: INTERNAL, see refusalOf).
      reports.unexpected(err);
      throw unavailable("authentication is unavailable", err);
    }
    const principal = fresh.principal;
    if (fresh.until > 0)
      memo.set(authorization!, {
        principal,
        epoch: fresh.epoch,
        keySet,
        until: fresh.until,
        offline: fresh.offline,
        credential: fresh.credential,
      });
    if (
      principal.certificateThumbprint !== undefined &&
      principal.certificateThumbprint !== certificateThumbprint
    )
      throw new TesseraAuthError("TOKEN_NOT_BOUND", "credential is bound to another client certificate");
    return principal;
  }

  const core: TesseraAuth = {
    admitted,
    authenticate: (authorization, certificateThumbprint, clientAddress) =>
      authenticate(authorization, certificateThumbprint, clientAddress),
    authorize,
    reportBug: reports.bug,
    holdStream: (...args) => streams.hold(...args),
    watching: () => watch?.healthy() ?? false,
    ready: (timeoutMs) => watch?.ready(timeoutMs) ?? Promise.resolve(false),
    stats: () => ({
      watch: watch?.stats(),
      cacheSize: cache.size,
      ...counters,
      verifyRefused: inflight.refused,
      verifyWaiting: inflight.waiting,
      jwksFetches: jwt.fetches,
      streams: streams.size,
    }),
    close() {
      // Nothing vouches for a held stream once the core stops following revocations.
      streams.endAll(unavailable("the service is shutting down"));
      watch?.close();
      cache.clear();
      memo.clear();
      reports.flush();
    },
  };
  return core;
}
