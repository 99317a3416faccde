import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import type { Logger } from "pino";
import { auditReason } from "../admission/audit.js";
import type { HttpObserver } from "../call-observer.js";
import type { RequestState } from "../context.js";
import { rateLimitHeaders } from "../rate-limit/refusal.js";
import { loggableError } from "../storage/errors.js";
import { reportRefusedSession } from "../storage/refused-sessions.js";
import { stopUnreadPlainBody } from "../transport/early-answers.js";
import { joinRepeatedAuthorization } from "../transport/node-bridge.js";
import { discoveryDocument, issuerOf, OAUTH_PATHS } from "./discovery.js";
import { countAddress, type OAuthRequest, readForm } from "./form.js";
import { type IntrospectionEndpointDeps, introspectionEndpoint } from "./introspect.js";
import { OAuthError } from "./oauth-error.js";
import { type RevocationEndpointDeps, revocationEndpoint } from "./revoke.js";
import { type TokenEndpointDeps, tokenEndpoint } from "./token.js";

export { authenticateClient, type ClientAuthentication, type OAuthRequest, readForm } from "./form.js";
export { OAuthError } from "./oauth-error.js";

/** What the OAuth 2.0 endpoints need. */
export interface OAuthDeps extends TokenEndpointDeps, RevocationEndpointDeps, IntrospectionEndpointDeps {
  logger: Pick<Logger, "error">;
  /** Metrics and the access line of every request (call-observer.ts), when either is on. */
  observe?: HttpObserver | undefined;
  /** auth.oauth.issuer */
  issuer: string | undefined;
  /** Whether the server speaks TLS (the scheme of an issuer taken from the request). */
  tls: boolean;
  /** server.maxBodyBytes */
  maxBodyBytes: number;
}

type Request = IncomingMessage | Http2ServerRequest;
type Response = ServerResponse | Http2ServerResponse;

/** The OAuth 2.0 endpoints as the HTTP layer (server/request-handler.ts) serves them. */
export interface OAuthEndpoints {
  /** Whether `path` (without query) is one of them. */
  handles(path: string): boolean;
  /** Answer a request for one of them; `state` is the request's (its id, address, certificate). */
  serve(req: Request, res: Response, path: string, state: RequestState): void;
}

/**
 * The plain HTTP endpoints of OAuth 2.0: `POST /oauth2/token` (token.ts), `POST
 * /oauth2/revoke` (revoke.ts), `POST /oauth2/introspect` (introspect.ts) and `GET
 * /.well-known/oauth-authorization-server` (discovery.ts). The POSTs share one reading of
 * the form and one client authentication (form.ts). Every answer is JSON with
 * `Cache-Control: no-store` (RFC 6749 §5.1) but the discovery document's; errors are RFC
 * 6749 §5.2's `{error, error_description}`; faults are 503 `temporarily_unavailable` with
 * Retry-After. Each request ends in one access line and its metrics (`deps.observe`).
 */
export function createOAuthEndpoints(deps: OAuthDeps): OAuthEndpoints {
  // The form-encoded POST endpoints by path.
  const posts = new Map<string, (req: OAuthRequest) => Promise<unknown>>([
    [OAUTH_PATHS.token, (req) => tokenEndpoint(deps, req)],
    [OAUTH_PATHS.introspection, (req) => introspectionEndpoint(deps, req)],
    [
      OAUTH_PATHS.revocation,
      async (req) => {
        await revocationEndpoint(deps, req);
        return undefined;
      },
    ],
  ]);

  const { observe } = deps;
  // A shared secret (HS256) publishes no key: the JWKS is empty, and not named.
  const publishesKeys = !deps.jwt.algorithms.includes("HS256");
  // The responses observed already: one line per request, whichever of the answer and the
  // client's going away comes first.
  const observed = new WeakSet<Response>();

  /**
   * Write the answer, once, and observe the request (its access line and metrics): `err`,
   * for an error answer, names its code and Tessera's reason behind it.
   */
  function send(
    req: Request,
    res: Response,
    call: { path: string; state: RequestState; err?: OAuthError },
    status: number,
    body: unknown,
    headers: Record<string, string> = {},
  ) {
    if (res.headersSent || res.writableEnded) return;
    // An answer given before the body was read (a refusal, a wrong method) does not leave the
    // stream held until requestTimeoutSeconds: HTTP/2 resets it once answered, HTTP/1.1
    // reads at most maxBodyBytes more (transport/early-answers.ts).
    if (!req.readableEnded) stopUnreadPlainBody(req, res, deps.maxBodyBytes);
    res.statusCode = status;
    for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
    res.setHeader("cache-control", headers["cache-control"] ?? "no-store");
    res.setHeader("pragma", "no-cache");
    if (body === undefined) {
      res.setHeader("content-length", "0");
      res.end();
    } else {
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify(body));
    }
    if (observe === undefined || observed.has(res)) return;
    observed.add(res);
    const cause = call.err === undefined ? undefined : (call.err as { cause?: unknown }).cause;
    observe(call.state, {
      path: call.path,
      httpMethod: req.method,
      status,
      error: call.err?.error,
      reason: cause === undefined ? undefined : auditReason(cause),
    });
  }

  function fail(req: Request, res: Response, path: string, err: unknown, state: RequestState) {
    const e = err instanceof OAuthError ? err : new OAuthError("server_error", "internal error", 500);
    if (e.status === 503) reportRefusedSession((err as { cause?: unknown }).cause, deps.logger);
    if (e.status === 500) {
      const cause = err instanceof OAuthError ? (err as { cause?: unknown }).cause : err;
      deps.logger.error(
        { requestId: state.requestId, method: "oauth2", err: loggableError(cause ?? err) },
        "request failed",
      );
    }
    send(req, res, { path, state, err: e }, e.status, e.body(), { ...limitHeaders(state), ...e.headers });
  }

  return {
    handles(path) {
      return path === OAUTH_PATHS.discovery || posts.has(path);
    },
    serve(req, res, path, state) {
      if (observe !== undefined) {
        // A client gone before its answer: observed as such (499), as RPCs are (canceled).
        res.once("close", () => {
          if (res.writableEnded || observed.has(res)) return;
          observed.add(res);
          observe(state, { path, httpMethod: req.method, status: 499, error: "canceled" });
        });
      }
      if (path === OAUTH_PATHS.discovery) {
        if (req.method !== "GET" && req.method !== "HEAD") {
          req.resume();
          fail(
            req,
            res,
            path,
            new OAuthError("invalid_request", "use GET", 405, { allow: "GET, HEAD" }),
            state,
          );
          return;
        }
        const issuer = issuerOf(deps.issuer, req.headers, deps.tls);
        if (issuer === undefined) {
          fail(req, res, path, new OAuthError("invalid_request", "no issuer: set auth.oauth.issuer"), state);
          return;
        }
        send(req, res, { path, state }, 200, discoveryDocument(issuer, publishesKeys), {
          // A configured issuer is the same for everyone; one taken from the request is not.
          "cache-control": deps.issuer !== undefined ? "public, max-age=300" : "no-store",
        });
        return;
      }
      const endpoint = posts.get(path)!;
      if (req.method !== "POST") {
        req.resume();
        fail(req, res, path, new OAuthError("invalid_request", "use POST", 405, { allow: "POST" }), state);
        return;
      }
      // Node kept the first of a repeated Authorization header: joined, form.ts refuses it.
      joinRepeatedAuthorization(req);
      (async () => {
        await countAddress(deps.limits, state);
        const form = await readForm(req, deps.maxBodyBytes);
        return endpoint({ headers: req.headers, form, state });
      })().then(
        (body) => send(req, res, { path, state }, 200, body, limitHeaders(state)),
        (err: unknown) => {
          // A refusal before the body was read (a rate limit): drained, not left on the connection.
          if (!req.readableEnded) req.resume();
          fail(req, res, path, err, state);
        },
      );
    },
  };
}

/** The X-RateLimit-* headers of the limit the request was counted on, if any. */
function limitHeaders(state: RequestState): Record<string, string> | undefined {
  return state.rateLimit && rateLimitHeaders(state.rateLimit);
}
