import { type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";
import { type Client, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { hasScope } from "../auth/scopes.js";
import { typedClient } from "./clients.js";
import { assertTokenShape, connectionOf, MAX_ANSWER_BYTES } from "./connection.js";
import { toClientError } from "./error-mapping.js";
import { defaultLogger, type TesseraLogger } from "./logger.js";
import { GuardedSessionManager, retryRefusedStream } from "./refused-stream.js";
import { type AutoRefreshOptions, Session, type TokenPair } from "./session.js";

/** Options of {@link UserAPI} (and {@link UserAPICore}). */
export interface UserAPIOptions {
  /** Access token (session JWT) or an opaque token (personal access token, API key, machine token). */
  token?: string | undefined;
  /**
   * Username and password sent as `Authorization: Basic` when no token is set (machine
   * users with Basic credentials; users when the server accepts Basic).
   */
  basicAuth?: { username: string; password: string } | undefined;
  /** Refresh token of a session; with `autoRefresh` the client renews the access token itself. */
  refreshToken?: string | undefined;
  /** Server host name or IP (default "localhost"). */
  host?: string | undefined;
  /** Server port (default 50052). */
  port?: number | undefined;
  /**
   * Folder with `ca.crt` (verifies the server) and optionally `client.crt` + `client.key`
   * (mutual TLS), as written by `tessera certs client`.
   */
  certFolder?: string | undefined;
  /** CA bundle to verify the server with; wins over the cert folder's ca.crt. Default: the system roots. */
  caFile?: string | undefined;
  /** Wire protocol: "grpc" (default) or "connect"; both over HTTP/2 with TLS. */
  protocol?: "grpc" | "connect" | undefined;
  /** Renew the access token before it expires and retry a call refused as expired, once (needs `refreshToken`). Default false. */
  autoRefresh?: boolean | AutoRefreshOptions | undefined;
  /** Called with every new token pair (login, refresh): persist it here. */
  onTokens?: ((pair: TokenPair) => void | Promise<void>) | undefined;
  /** Default deadline of each call in milliseconds (default 30000; 0 for none). */
  timeoutMs?: number | undefined;
  /**
   * The largest answer the client reads, in bytes (one message, decompressed; default 16 MiB,
   * far above any of Tessera's): a larger one fails the call with `MessageTooLargeError`.
   * Named as connect-node names it, whose own default of 4 GiB lets a server (or a gzip bomb
   * of a few kilobytes from it) have the client buffer gigabytes.
   */
  readMaxBytes?: number | undefined;
  /**
   * Where the client reports what it would otherwise drop silently (an automatic renewal
   * that failed): `{ warn(obj, msg), error(obj, msg), info?(obj, msg) }`, so a pino logger fits
   * as is. Never a token or password. Default: silent, unless `NODE_DEBUG=tessera` (stderr).
   */
  logger?: TesseraLogger | undefined;
  /** Extra Connect interceptors (tracing, logging), run inside the one that attaches credentials. */
  interceptors?: Interceptor[] | undefined;
  /** Connect without TLS (a server started with insecurePlaintext; development only). */
  plaintext?: boolean | undefined;
  /**
   * Verify the server's certificate (default true). `false` accepts any certificate,
   * so anyone between client and server can read the token: it is refused
   * ({@link ClientConfigError}) unless `insecure: true` says so explicitly too.
   */
  verifySsl?: boolean | undefined;
  /** The explicit opt-in that `verifySsl: false` requires (development against a throwaway server only). */
  insecure?: boolean | undefined;
}

/** The caller as {@link UserAPI.getUser} returns it. */
export interface CurrentUser {
  id: string;
  username: string;
  tenantId: string;
  /** Effective scopes, e.g. "cluster:read", "admin:*", "*". */
  permissions: string[];
  createdAt: Date | undefined;
  /** The verified client certificate of the connection (mutual TLS), when one was presented. */
  clientCertificate: { sha256Fingerprint: string; commonName: string; sanUris: string[] } | undefined;
}

/** The result of {@link UserAPI.login}. */
export interface LoginResult extends TokenPair {
  user: { id: string; username: string; tenantId: string; permissions: string[] };
}

const date = (t: Timestamp | undefined): Date | undefined => (t ? timestampDate(t) : undefined);

/**
 * The core of {@link UserAPI}: one HTTP/2 connection (TLS, optionally mutual) to a
 * server, the session's tokens and UserService, without the other services' clients.
 * It exists so that a program needing one service (the CLI's `whoami` among them) loads
 * that service's generated descriptors only: {@link UserAPI} builds a client for every
 * service, so importing it decodes all their descriptors. Reach any other service with
 * {@link UserAPICore.client}. Failed calls reject with typed errors
 * ({@link AuthenticationError}, {@link TokenExpiredError}, …).
 */
export class UserAPICore {
  readonly host: string;
  readonly port: number;
  readonly protocol: "grpc" | "connect";
  /** UserService: sessions and user administration. */
  readonly users: Client<typeof UserService>;
  /** The transport every client of this API shares (for services not wrapped here). */
  readonly transport: Transport;

  private readonly session: Session;
  private readonly sessions: GuardedSessionManager;
  private readonly rawUsers: Client<typeof UserService>;
  /** Unmapped client for renewals inside the interceptor (which must throw ConnectErrors). */
  private readonly plainUsers: Client<typeof UserService>;
  private userCache: { token: string | undefined; user: CurrentUser } | undefined;
  /** The credentials held, scrubbed from any client-side error message. */
  protected readonly secrets: () => readonly (string | undefined)[];

  constructor(options: UserAPIOptions = {}) {
    const { host, port, protocol, baseUrl, tls } = connectionOf(options);
    this.host = host;
    this.port = port;
    this.protocol = protocol;
    // Our own session manager, so close() can end the connection deterministically; guarded,
    // so a server's GOAWAY to an idle connection cannot throw in the application's process.
    this.sessions = new GuardedSessionManager(baseUrl, {}, { ...tls });

    this.session = new Session({
      accessToken: options.token,
      refreshToken: options.refreshToken,
      basicAuth: options.basicAuth,
      autoRefresh: options.autoRefresh ?? false,
      onTokens: options.onTokens,
      refresh: (rt) => this.spendRefreshToken(rt),
      logger: options.logger ?? defaultLogger,
    });
    const common = {
      baseUrl,
      sessionManager: this.sessions,
      // Outermost: a call crossing the server's GOAWAY (a recycled connection) was refused
      // before any of it ran, credentials and refresh included, and is sent again once.
      interceptors: [retryRefusedStream, this.session.interceptor(), ...(options.interceptors ?? [])],
      readMaxBytes: options.readMaxBytes ?? MAX_ANSWER_BYTES,
      ...(options.timeoutMs === 0 ? {} : { defaultTimeoutMs: options.timeoutMs ?? 30_000 }),
    };
    this.transport =
      this.protocol === "grpc"
        ? createGrpcTransport(common)
        : createConnectTransport({ ...common, httpVersion: "2", useBinaryFormat: true });
    const secrets = () => [
      this.session.accessToken,
      this.session.refreshToken,
      options.token,
      options.refreshToken,
      options.basicAuth?.password,
    ];
    this.rawUsers = typedClient(UserService, this.transport, secrets);
    this.users = this.rawUsers;
    this.plainUsers = createClient(UserService, this.transport);
    this.secrets = secrets;
  }

  /** A typed client (errors mapped, credentials attached) for any service descriptor. */
  client<S extends Parameters<typeof typedClient>[0]>(service: S): Client<S> {
    return typedClient(service, this.transport, this.secrets);
  }

  /** The current access token (it changes when the session is refreshed). */
  get token(): string | undefined {
    return this.session.accessToken;
  }

  /** The current refresh token, if the client holds a session. */
  get currentRefreshToken(): string | undefined {
    return this.session.refreshToken;
  }

  /** Replace the credentials the client sends. */
  setToken(token: string | undefined, refreshToken?: string): void {
    if (token !== undefined) assertTokenShape(token, "token");
    if (refreshToken !== undefined) assertTokenShape(refreshToken, "refresh token");
    this.session.accessToken = token;
    if (refreshToken !== undefined || token === undefined) this.session.refreshToken = refreshToken;
  }

  /** Who the token belongs to and its effective permissions (UserService.GetCurrentUser). */
  async getUser(): Promise<CurrentUser> {
    const res = await this.users.getCurrentUser({});
    const cc = res.clientCertificate;
    const user: CurrentUser = {
      id: res.id,
      username: res.username,
      tenantId: res.tenantId,
      permissions: [...res.permissions],
      createdAt: date(res.createdAt),
      clientCertificate: cc
        ? { sha256Fingerprint: cc.sha256Fingerprint, commonName: cc.commonName, sanUris: [...cc.sanUris] }
        : undefined,
    };
    this.userCache = { token: this.session.accessToken, user };
    return user;
  }

  /**
   * Whether the caller's permissions cover `scope`, with the server's wildcard rules
   * (`ns:*`, `*`). Fetches the permissions once per token.
   */
  async hasPermission(scope: string): Promise<boolean> {
    const cached = this.userCache?.token === this.session.accessToken ? this.userCache?.user : undefined;
    const user = cached ?? (await this.getUser());
    return hasScope(user.permissions, scope);
  }

  /**
   * Log in with a username and password; the client then uses the new session.
   * `options.tenant` (a tenant name or id) names the user's tenant: usernames are unique
   * per tenant, and a username alone reaches only the default tenant's users (and those
   * from before usernames were per tenant).
   */
  async login(username: string, password: string, options: { tenant?: string } = {}): Promise<LoginResult> {
    const res = await this.rawUsers.login({ username, password, tenant: options.tenant ?? "" });
    const pair: TokenPair = {
      accessToken: res.accessToken,
      refreshToken: res.refreshToken,
      accessTokenExpiresAt: date(res.accessTokenExpiresAt),
      refreshTokenExpiresAt: date(res.refreshTokenExpiresAt),
    };
    await this.session.adopt(pair);
    const u = res.user;
    return {
      ...pair,
      user: {
        id: u?.id ?? "",
        username: u?.username ?? username,
        tenantId: u?.tenantId ?? "",
        permissions: [...(u?.permissions ?? [])],
      },
    };
  }

  /**
   * Spend a refresh token (default: the one the client holds) for a new pair; the
   * client then uses it. Renewals of the held token are shared between concurrent
   * callers, since a refresh token is single-use.
   */
  async refreshToken(refreshToken?: string): Promise<TokenPair> {
    try {
      if (refreshToken === undefined || refreshToken === this.session.refreshToken)
        return await this.session.refresh();
      assertTokenShape(refreshToken, "refresh token");
      const pair = await this.spendRefreshToken(refreshToken);
      await this.session.adopt(pair);
      return pair;
    } catch (err) {
      throw toClientError(err, [...this.secrets(), refreshToken]);
    }
  }

  /** End the session on the server (revokes its refresh tokens) and forget the tokens. */
  async logout(refreshToken?: string): Promise<void> {
    const rt = refreshToken ?? this.session.refreshToken;
    if (rt) await this.rawUsers.logout({ refreshToken: rt });
    this.session.accessToken = undefined;
    this.session.refreshToken = undefined;
    this.userCache = undefined;
  }

  /** Close the connection. Pending calls fail; the client is not usable afterwards. */
  close(): void {
    // Safe in the turn a stream was reset (Node 20's client spins when a session is destroyed
    // then with another stream open): connect-node destroys with an error and CANCEL, which
    // does not (destroy() with a code alone, or an error alone, does: bench/results/2026-12-10-held-streams.md).
    this.sessions.abort();
  }

  private async spendRefreshToken(refreshToken: string): Promise<TokenPair> {
    const res = await this.plainUsers.refreshToken({ refreshToken });
    return {
      accessToken: res.accessToken,
      refreshToken: res.refreshToken,
      accessTokenExpiresAt: date(res.accessTokenExpiresAt),
      refreshTokenExpiresAt: date(res.refreshTokenExpiresAt),
    };
  }
}
