import type { DescMethod } from "@bufbuild/protobuf";
import { getOption, hasOption } from "@bufbuild/protobuf";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { auth } from "../../gen/tessera/v1/options_pb.js";
import { errorDetail } from "./error-mapping.js";
import { errorFields, type TesseraLogger } from "./logger.js";

/** A session's token pair as the server issued it. */
export interface TokenPair {
  accessToken: string;
  refreshToken: string;
  accessTokenExpiresAt: Date | undefined;
  refreshTokenExpiresAt: Date | undefined;
}

/** Options of automatic refresh. */
export interface AutoRefreshOptions {
  /**
   * Renew this many seconds before the access token expires (default 30; never more
   * than half the token's lifetime, so short-lived tokens are not renewed on every call).
   */
  leewaySeconds?: number;
  /**
   * Renew ahead of expiry from the token's `exp` claim (default true). With false the
   * client renews only when the server answers TOKEN_EXPIRED (e.g. when the local clock
   * is not trusted).
   */
  proactive?: boolean;
}

/** Read `exp` and `iat` from a JWT payload without verifying it (the server verifies). */
export function decodeJwtTimes(token: string): { exp: number; iat: number | undefined } | undefined {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts[1]) return undefined;
  try {
    const payload = JSON.parse(Buffer.from(parts[1], "base64url").toString("utf8")) as {
      exp?: unknown;
      iat?: unknown;
    };
    if (typeof payload.exp !== "number") return undefined;
    return { exp: payload.exp, iat: typeof payload.iat === "number" ? payload.iat : undefined };
  } catch {
    return undefined;
  }
}

/**
 * Whether a call to `method` carries the access token: every Tessera method except the
 * public ones (Login, RefreshToken, Logout) and the standard grpc.* services, so a token
 * is never sent where it is not needed.
 */
export function sendsCredential(method: DescMethod): boolean {
  if (method.parent.typeName.startsWith("grpc.")) return false;
  if (hasOption(method, auth)) return !getOption(method, auth).public;
  return true;
}

/** The check of a token's shape (kept here too, where it was first exported). */
export { assertTokenShape } from "./connection.js";

/**
 * The credential state of one client: the current access token and refresh token,
 * the single-flight refresh, and the interceptor that sets `Authorization` on every
 * call (read per call, so a refresh takes effect at once) and renews the session.
 */
export class Session {
  accessToken: string | undefined;
  refreshToken: string | undefined;
  private inflight: Promise<TokenPair> | undefined;
  private readonly leeway: number;
  private readonly proactive: boolean;
  /** Renewals failed in a row: a warning for the first, info when one succeeds again. */
  private refreshFailures = 0;

  constructor(
    private readonly opts: {
      accessToken?: string | undefined;
      refreshToken?: string | undefined;
      /** Sent as Authorization: Basic when there is no access token. */
      basicAuth?: { username: string; password: string } | undefined;
      autoRefresh: boolean | AutoRefreshOptions;
      /** Spends a refresh token for a new pair (the RefreshToken RPC). */
      refresh: (refreshToken: string) => Promise<TokenPair>;
      /** Called with every new pair (login, refresh), e.g. to persist it. */
      onTokens?: ((pair: TokenPair) => void | Promise<void>) | undefined;
      /** Where renewals that fail are reported: the first of a run, and the success that ends it. */
      logger: TesseraLogger;
    },
  ) {
    this.accessToken = opts.accessToken;
    this.refreshToken = opts.refreshToken;
    const o = typeof opts.autoRefresh === "object" ? opts.autoRefresh : {};
    this.leeway = o.leewaySeconds ?? 30;
    this.proactive = o.proactive ?? true;
  }

  get autoRefresh(): boolean {
    return this.opts.autoRefresh !== false && this.refreshToken !== undefined;
  }

  /** Adopt a new pair and tell the listener. */
  async adopt(pair: TokenPair): Promise<void> {
    this.accessToken = pair.accessToken;
    this.refreshToken = pair.refreshToken;
    await this.opts.onTokens?.(pair);
  }

  /**
   * Renew the session with the held refresh token. Concurrent callers share one
   * request: a refresh token is single-use, and the server revokes the whole session
   * when one is spent twice.
   */
  refresh(): Promise<TokenPair> {
    if (this.inflight) return this.inflight;
    const rt = this.refreshToken;
    if (!rt)
      return Promise.reject(
        new ConnectError("no refresh token to renew the session with", Code.Unauthenticated),
      );
    this.inflight = (async () => {
      try {
        const pair = await this.opts.refresh(rt);
        await this.adopt(pair);
        if (this.refreshFailures > 0)
          this.opts.logger.info?.({ failures: this.refreshFailures }, "session renewed again");
        this.refreshFailures = 0;
        return pair;
      } catch (err) {
        // A proactive renewal's failure is otherwise swallowed (the call goes on with the
        // current token); one line per run of failures, whatever the number of calls.
        if (++this.refreshFailures === 1)
          this.opts.logger.warn(
            // Without the message: a client-side one may quote what it was given.
            {
              error: {
                ...errorFields(err, false),
                ...(err instanceof ConnectError ? { reason: errorDetail(err)?.reason } : {}),
              },
            },
            "session renewal failed: calls go on with the current access token until it expires",
          );
        throw err;
      } finally {
        this.inflight = undefined;
      }
    })();
    return this.inflight;
  }

  /** Whether the access token expires within the leeway (false when its expiry is unknown). */
  expiresSoon(now = Date.now() / 1000): boolean {
    if (!this.accessToken) return false;
    const t = decodeJwtTimes(this.accessToken);
    if (!t) return false;
    const lifetime = t.iat !== undefined ? t.exp - t.iat : Number.POSITIVE_INFINITY;
    const leeway = Math.min(this.leeway, lifetime / 2);
    return t.exp - now <= leeway;
  }

  /** The interceptor: Authorization header, proactive renewal, one retry after TOKEN_EXPIRED. */
  interceptor(): Interceptor {
    return (next) => async (req) => {
      if (!sendsCredential(req.method)) return next(req);
      let refreshError: unknown;
      if (this.autoRefresh && this.proactive && this.expiresSoon()) {
        try {
          await this.refresh();
        } catch (err) {
          // Try the call anyway: the current token may still be accepted.
          refreshError = err;
        }
      }
      const used = this.accessToken;
      if (used) req.header.set("authorization", `Bearer ${used}`);
      else if (this.opts.basicAuth) {
        const { username, password } = this.opts.basicAuth;
        req.header.set(
          "authorization",
          `Basic ${Buffer.from(`${username}:${password}`, "utf8").toString("base64")}`,
        );
      }
      try {
        return await next(req);
      } catch (err) {
        if (!this.autoRefresh || req.stream || !isExpired(err)) throw err;
        if (refreshError) throw refreshError;
        // Another call may have renewed the session meanwhile; then only retry.
        if (this.accessToken === used) await this.refresh();
        req.header.set("authorization", `Bearer ${this.accessToken}`);
        return await next(req);
      }
    };
  }
}

function isExpired(err: unknown): boolean {
  if (!(err instanceof ConnectError) || err.code !== Code.Unauthenticated) return false;
  return errorDetail(err)?.reason === "TOKEN_EXPIRED";
}
