// The options and the figures of the core (tessera-auth.ts), apart so that it stays one concept.
import type { Transport } from "@connectrpc/connect";
import type { TesseraLogger } from "../logger.js";
import type { JwtVerifyMode } from "./jwt-paths.js";
import type { JwtAlgorithm } from "./offline-jwt.js";
import type { RevocationWatchStats } from "./revocation-watch.js";

/** Options of {@link createTesseraAuth} (and of the interceptor and middleware built on it). */
export interface TesseraAuthOptions {
  /** Tessera's address, e.g. `https://tessera.internal:50052`. */
  server: string;
  /**
   * A folder with `ca.crt` (verifies Tessera) and, for a service that authenticates to
   * Tessera by a bound client certificate, `client.crt` + `client.key` (as the SDK's clients).
   */
  certFolder?: string;
  /** A CA bundle to verify Tessera with, instead of the folder's `ca.crt`. */
  caFile?: string;
  /**
   * This service's own credential for VerifyCredential and WatchRevocations (a machine
   * user holding `auth:verify`): its machine token, or `Basic <base64(user:password)>`.
   * Unset: the client certificate of `certFolder` alone.
   */
  credential?: string;
  /** `iss` and `aud` access tokens must carry (Tessera's `auth.jwt.issuer` / `audience`; default "tessera"). */
  issuer?: string;
  audience?: string;
  /** JWS algorithms verified offline, a subset of EdDSA and ES256 (default both). */
  algorithms?: readonly JwtAlgorithm[];
  /**
   * How JWTs are verified (default "auto"): "offline" against the JWKS only, refusing any
   * other algorithm; "online" every JWT by VerifyCredential, as an opaque credential (cached
   * and revoked alike); "auto" by what the deployment publishes, never by the token's header
   * alone: offline while the JWKS holds a key `algorithms` accepts (an HS256 token is then
   * refused without asking Tessera), by VerifyCredential when it holds none, as a Tessera
   * signing HS256 (`auth.jwt.secret`) publishes no key.
   */
  jwt?: { verify?: JwtVerifyMode };
  /** Tolerated clock difference with Tessera in seconds, for nbf/iat (default 30; never added to exp). */
  clockSkewSeconds?: number;
  /** The positive cache of VerifyCredential answers (default 10,000 entries, 300 s at most); false: none. */
  cache?: { max?: number; ttlSeconds?: number } | false;
  /** Where the JWKS is (default: the discovery document's `jwks_uri`, else `/.well-known/jwks.json`). */
  jwksUri?: string;
  /** Least time between two JWKS fetches caused by unknown kids (default 30 s). */
  jwksRefetchGapMs?: number;
  /** Age after which the JWKS is fetched again (default 300 s, its Cache-Control). */
  jwksMaxAgeMs?: number;
  /** Deadline of one VerifyCredential call (default 2 s); past it the call is refused with 503. */
  verifyTimeoutMs?: number;
  /**
   * Distinct credentials verified by Tessera at once (default 1024); past it a new call is
   * refused with 503 at once. Calls for one credential share one verification. A held
   * stream's re-check after a loss of the watch (every stream it vouched for is re-checked
   * then, and Tessera ends the watch about hourly) instead waits, first in first out, for a
   * slot, for up to 5 s: only then is it refused and the stream ended with 503 (counted in
   * `verifyRefused`, reported once per interval). So does the re-check every 5 s while the
   * watch is down (or off), but ahead of a loss's (first in first out among themselves), so
   * that new calls, which anyone can send, never end a held stream; each stream's comes after
   * between 5 s and 6 s, at random, so that they do not come in bursts. Waiting re-checks fly
   * in at most 3/4 of the slots (at least 1); the rest stay free for new calls and for the
   * re-checks that never wait: a revocation event's and a certificate's end. So a revocation
   * Tessera records while the watch is down (no event comes) ends a held stream within
   * 11 s + 2 × `verifyTimeoutMs` (15 s by default: the check answering just before it, up to
   * 6 s, a wait of up to 5 s, the check that refuses it or 503); 6 s + 2 × `verifyTimeoutMs`
   * while a slot is free. If the watch comes back meanwhile, the events it replays end it. While a
   * re-check waits the stream runs on its last admission, as during any re-check, and the
   * cache stays empty, so nothing else is admitted on the strength of it.
   */
  maxConcurrentVerifications?: number;
  /** Longest lifetime of an access token (default 1 day): older tokens are verified by Tessera. */
  maxTokenLifetimeSeconds?: number;
  /** Follow WatchRevocations (default true). Without it every opaque credential and JWT is verified per call. */
  watch?: boolean;
  /** Reconnection backoff of the watch stream (ms). */
  watchBackoffMs?: { min: number; max: number };
  /** The transport to Tessera (default: gRPC over HTTP/2 and TLS from `server` and `certFolder`). */
  transport?: Transport;
  /** GET a JSON document from Tessera (default: node:https with `certFolder`'s CA): a custom HTTP client, or tests. */
  fetchJson?: (url: string) => Promise<unknown>;
  /** Clock (tests). */
  now?: () => number;
  /**
   * Where the core reports what it would otherwise drop silently: the revocation stream
   * going down (a warning, once until it is back) and coming back (info), a reset by
   * Tessera, JWKS fetches failing, and, one line per 10 s interval that had any with their
   * count (a caller can cause them per request), calls refused past
   * `maxConcurrentVerifications` (held streams' re-checks that waited past their deadline on
   * a line of their own), VerifyCredential calls that failed, and unexpected faults.
   * Never a credential, nor a prefix or hash of one. A pino logger fits as is. Default:
   * silent, unless `NODE_DEBUG=tessera` (then stderr).
   */
  logger?: TesseraLogger;
}

/** Counters for tests, metrics and the bench. */
export interface TesseraAuthStats {
  watch: RevocationWatchStats | undefined;
  cacheSize: number;
  cacheHits: number;
  verifyCalls: number;
  /**
   * Calls refused (503) because `maxConcurrentVerifications` credentials were being verified:
   * new calls at once, held streams' re-checks once they waited past their deadline.
   */
  verifyRefused: number;
  /** Held streams' re-checks waiting for a verification slot now. */
  verifyWaiting: number;
  offlineJwts: number;
  jwksFetches: number;
  /** Streaming calls held open (see {@link TesseraAuth.holdStream}). */
  streams: number;
}
