import type { IncomingHttpHeaders, IncomingMessage } from "node:http";
import type { Http2ServerRequest } from "node:http2";
import type { AuthRule } from "../../gen/tessera/v1/options_pb.js";
import { ruleRefusal } from "../admission/auth-rule.js";
import { authenticationRefusal, spendFailure } from "../admission/authenticate.js";
import type { Authenticator } from "../auth/authenticator.js";
import { type HeaderSource, type PresentedCredential, parseCredentials } from "../auth/credentials.js";
import type { Principal } from "../auth/principal.js";
import { ONE_AUTHORIZATION } from "../auth/repeated-authorization.js";
import { budgetKey } from "../client-ip.js";
import type { RequestState } from "../context.js";
import { TesseraError, wwwAuthenticate } from "../errors.js";
import { invalidCharacterAt } from "../interceptors/input.js";
import { type RateLimits, rateLimitedError } from "../rate-limit.js";
import { onCappedData } from "../transport/node-bridge.js";
import {
  asOAuthError,
  BASIC_CHALLENGE,
  type ClientAuthMethod,
  OAuthError,
  withCause,
} from "./oauth-error.js";

/**
 * What the OAuth 2.0 endpoints share: reading a form-encoded body (RFC 6749 §3.2), client
 * authentication (client_secret_basic, client_secret_post, tls_client_auth, and a bearer
 * where an endpoint allows one); the error answer is oauth-error.ts.
 */

/** A request to an OAuth endpoint once its body is read. */
export interface OAuthRequest {
  headers: IncomingHttpHeaders;
  /** The form parameters, each present at most once, none empty (RFC 6749 §3.1: an empty one is omitted). */
  form: ReadonlyMap<string, string>;
  state: RequestState;
}

/** An authenticated client. */
export interface ClientAuthentication {
  principal: Principal;
  method: ClientAuthMethod;
}

/** What client authentication needs: the verifiers, and the budgets when rate limits are on. */
export interface ClientAuthDeps {
  authenticator: Authenticator;
  limits?: RateLimits | undefined;
}

const FORM_TYPE = "application/x-www-form-urlencoded";

/**
 * Read `req`'s body as `application/x-www-form-urlencoded` (RFC 6749 §3.2), at most
 * `maxBytes` (the server's body limit). Each parameter at most once (§3.2: "Request and
 * response parameters MUST NOT be included more than once"); a parameter without a value
 * is treated as omitted (§3.1); no control characters (a NUL would reach the database).
 * @throws OAuthError invalid_request (413 when the body is too large)
 */
export async function readForm(
  req: IncomingMessage | Http2ServerRequest,
  maxBytes: number,
): Promise<Map<string, string>> {
  const type = (req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
  if (type !== FORM_TYPE) {
    req.resume();
    throw new OAuthError("invalid_request", `the body must be ${FORM_TYPE}`);
  }
  const query = (req.url ?? "").indexOf("?");
  if (query >= 0 && query < (req.url ?? "").length - 1) {
    req.resume();
    // Credentials in a URL end up in logs (RFC 6749 §2.3.1, §3.2).
    throw new OAuthError("invalid_request", "parameters go in the body, not in the URL");
  }
  const declared = Number(req.headers["content-length"] ?? 0);
  if (declared > maxBytes) {
    req.resume();
    throw new OAuthError("invalid_request", "request body too large", 413);
  }
  const text = await new Promise<string>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let over = false;
    onCappedData(
      req,
      maxBytes,
      (chunk) => chunks.push(chunk),
      () => {
        over = true;
        chunks.length = 0;
        reject(new OAuthError("invalid_request", "request body too large", 413));
      },
    );
    req.on("end", () => {
      if (!over) resolve(Buffer.concat(chunks).toString("utf8"));
    });
    // The client went away (or broke its stream) mid-body: its doing, never a fault of
    // Tessera's to log at error level, which anyone could then do at will.
    req.on("error", () => {
      if (!over) reject(new OAuthError("invalid_request", "the request body was cut short"));
    });
  });
  const form = new Map<string, string>();
  const seen = new Set<string>();
  for (const [name, value] of new URLSearchParams(text)) {
    if (seen.has(name)) throw new OAuthError("invalid_request", `parameter "${safeName(name)}" is repeated`);
    seen.add(name);
    if (invalidCharacterAt(name) >= 0 || invalidCharacterAt(value) >= 0)
      throw new OAuthError("invalid_request", "parameters must not contain control characters");
    if (value !== "") form.set(name, value);
  }
  return form;
}

/** A parameter name fit for an error message (the client's text, cut and stripped). */
function safeName(name: string): string {
  return name.replace(/[^A-Za-z0-9_.-]/g, "").slice(0, 40);
}

/**
 * The scopes of a `scope` parameter (RFC 6749 §3.3: space-delimited), or undefined when absent.
 * One that holds no scope at all (`scope=+`, blanks) is malformed (§3.3: at least one
 * scope-token), not a request for none: `invalid_scope`. Read as absent instead, it would
 * grant the default (every scope) to a client that asked for less; read as an empty list,
 * it issued a token with no scope.
 * @throws OAuthError invalid_scope
 */
export function scopeParameter(form: ReadonlyMap<string, string>): string[] | undefined {
  const value = form.get("scope");
  if (value === undefined) return undefined;
  const scopes = value.split(" ").filter((s) => s.length > 0);
  if (scopes.length === 0)
    throw withCause(
      new OAuthError("invalid_scope", "scope names no scope; omit it for the default"),
      new TesseraError("INVALID_ARGUMENT", "scope names no scope"),
    );
  return scopes;
}

/** Decode one part of client_secret_basic (RFC 6749 §2.3.1: form-urlencoded before base64). */
function formDecode(part: string): string {
  try {
    return decodeURIComponent(part.replace(/\+/g, " "));
  } catch {
    throw malformed();
  }
}

/** A malformed client credential: refused (and counted) as a wrong one is. */
function malformed(): TesseraError {
  return new TesseraError("AUTH_HEADER_MALFORMED", "client credentials are malformed");
}

/** The credential a request presents as its client, and how. */
function presentedClient(
  req: OAuthRequest,
  allowBearer: boolean,
): { credential: PresentedCredential | null; method: ClientAuthMethod } {
  const { headers, form } = req;
  const authorization = headers.authorization;
  const secret = form.get("client_secret");
  const clientId = form.get("client_id");
  if (authorization !== undefined || headers["x-api-key"] !== undefined) {
    if (secret !== undefined)
      throw new OAuthError("invalid_request", "use one client authentication method, not several");
    const scheme = (authorization ?? "").trim().split(" ")[0]!.toLowerCase();
    // A repeated header, joined (oauth/index.ts): two credentials in one request, whichever of
    // them is valid: RFC 6749 §5.2's invalid_request ("includes multiple credentials"). Neither
    // base64 nor a token holds ", " (see parseCredentials).
    if ((scheme === "basic" || scheme === "bearer") && authorization!.includes(", "))
      throw withCause(
        new OAuthError("invalid_request", ONE_AUTHORIZATION),
        new TesseraError("AUTH_HEADER_MALFORMED", ONE_AUTHORIZATION),
      );
    if (scheme === "basic" && headers["x-api-key"] === undefined) {
      const encoded = authorization!.trim().slice(5).trim();
      if (!/^[A-Za-z0-9+/]+={0,2}$/.test(encoded)) throw malformed();
      const decoded = Buffer.from(encoded, "base64").toString("utf8");
      const colon = decoded.indexOf(":");
      if (colon <= 0) throw malformed();
      const username = formDecode(decoded.slice(0, colon));
      const password = formDecode(decoded.slice(colon + 1));
      if (invalidCharacterAt(username) >= 0 || invalidCharacterAt(password) >= 0) throw malformed();
      if (clientId !== undefined && clientId !== username)
        throw new OAuthError("invalid_request", "client_id does not match the Authorization header");
      return { credential: { type: "basic", username, password }, method: "client_secret_basic" };
    }
    if (!allowBearer)
      throw new OAuthError(
        "invalid_client",
        "authenticate with client_secret_basic, client_secret_post or tls_client_auth",
        401,
        BASIC_CHALLENGE,
      );
    // Bearer or X-API-Key: the same parsing (and refusals) as every RPC's.
    const credential = parseCredentials(nodeHeaders(headers));
    if (credential === null || credential.type === "basic")
      throw new OAuthError("invalid_client", "client credentials are malformed", 401, BASIC_CHALLENGE);
    return { credential, method: "bearer" };
  }
  if (secret !== undefined) {
    if (clientId === undefined) throw new OAuthError("invalid_request", "client_secret needs client_id");
    return {
      credential: { type: "basic", username: clientId, password: secret },
      method: "client_secret_post",
    };
  }
  if (req.state.certificate !== null) return { credential: null, method: "tls_client_auth" };
  throw new TesseraError("AUTH_REQUIRED", "client authentication required");
}

/** Node's incoming headers read as fetch Headers would read them. */
function nodeHeaders(headers: IncomingHttpHeaders): HeaderSource {
  return {
    get(name) {
      const v = headers[name];
      return v === undefined ? null : typeof v === "string" ? v : v.join(", ");
    },
  };
}

/**
 * Whether the request presents client credentials (a header or client_secret). A client
 * certificate alone is not counted: a connection may carry one without the client choosing
 * tls_client_auth (every connection does with mtls: require).
 */
export function presentsClientSecret(req: OAuthRequest): boolean {
  return (
    req.headers.authorization !== undefined ||
    req.headers["x-api-key"] !== undefined ||
    req.form.has("client_secret")
  );
}

/**
 * Authenticate the client of an OAuth request: `client_secret_basic` (a machine user's
 * Basic pair, each part form-urlencoded as RFC 6749 §2.3.1 says; plain pairs decode to
 * themselves), `client_secret_post` (`client_id` and `client_secret` in the body),
 * `tls_client_auth` (RFC 8705: the connection's client certificate bound to a machine
 * user; a `client_id` sent with it must be that machine user's id), or, with
 * `allowBearer`, any bearer credential Tessera accepts (Authorization: Bearer, X-API-Key).
 * One method per request (RFC 6749 §2.3).
 *
 * Verified by the same code as every RPC's credentials (admission/authenticate.ts): a
 * password's budgets are reserved before PBKDF2, a credential that does not verify spends
 * a point of the address's failure budget, then the per-principal limit counts the call.
 * With `rule` (the auth rule of the RPC an endpoint stands for), the client is then
 * authorized by it as admission authorizes that RPC's callers (admission/index.ts
 * `ruleRefusal`): a refusal is 403 `insufficient_scope` with its challenge.
 * Sets `state.principal`. The per-IP limit is the caller's to count first ({@link countAddress}).
 * @throws OAuthError invalid_client (401 with WWW-Authenticate), invalid_request,
 *   insufficient_scope (403, with `rule`), or a fault's answer
 */
export async function authenticateClient(
  deps: ClientAuthDeps,
  req: OAuthRequest,
  options: { allowBearer?: boolean; rule?: AuthRule } = {},
): Promise<ClientAuthentication> {
  let presented: ReturnType<typeof presentedClient>;
  try {
    presented = presentedClient(req, options.allowBearer ?? false);
  } catch (err) {
    // A malformed credential is a failed authentication like any other: it spends budget
    // (none sent, AUTH_REQUIRED, does not).
    const refusal = deps.limits ? await spendFailure(deps.limits, req.state, err) : err;
    if (options.allowBearer && refusal instanceof TesseraError && refusal.reason === "AUTH_REQUIRED")
      // Nothing presented where a bearer would do: both schemes are challenged (RFC 7235 §4.1).
      throw withCause(
        new OAuthError("invalid_client", refusal.message, 401, {
          "www-authenticate": `Bearer realm="tessera", ${BASIC_CHALLENGE["www-authenticate"]}`,
        }),
        refusal,
      );
    throw asOAuthError(refusal, "client");
  }
  const refusal = await authenticationRefusal(deps, presented.credential, req.state);
  if (refusal !== undefined) throw asOAuthError(refusal, "client", presented.method);
  const principal = req.state.principal!;
  const clientId = req.form.get("client_id");
  if (presented.method === "tls_client_auth" && clientId !== undefined && clientId !== principal.id) {
    req.state.principal = null;
    throw new OAuthError(
      "invalid_client",
      "client_id does not name the certificate's machine user",
      401,
      BASIC_CHALLENGE,
    );
  }
  if (options.rule !== undefined) {
    const denied = ruleRefusal(options.rule, principal);
    if (denied !== undefined) {
      const challenge = denied.headers["www-authenticate"] ?? wwwAuthenticate(denied.reason, denied.message);
      throw withCause(
        new OAuthError("insufficient_scope", denied.message, 403, { "www-authenticate": challenge }),
        denied,
      );
    }
  }
  if (deps.limits) {
    let result: Awaited<ReturnType<RateLimits["perPrincipal"]["consume"]>>;
    try {
      result = await deps.limits.perPrincipal.consume(`${principal.kind}:${principal.id}`);
    } catch (err) {
      throw asOAuthError(err, "client");
    }
    if (!result.allowed) throw asOAuthError(rateLimitedError(result), "client");
    req.state.rateLimit ??= result;
  }
  return { principal, method: presented.method };
}

/** Authenticate the caller of introspection or revocation (a bearer credential too) and read its `token`. */
export async function tokenRequest(deps: ClientAuthDeps, req: OAuthRequest, rule?: AuthRule) {
  const { principal } = await authenticateClient(deps, req, { allowBearer: true, rule });
  const token = req.form.get("token");
  if (token === undefined) throw new OAuthError("invalid_request", "token is required");
  return { principal, token };
}

/**
 * Count the request against the per-IP limit (every OAuth request, as every RPC).
 * @throws OAuthError temporarily_unavailable (429, Retry-After) once over it
 */
export async function countAddress(limits: RateLimits | undefined, state: RequestState): Promise<void> {
  if (!limits) return;
  let result: Awaited<ReturnType<RateLimits["perIp"]["consume"]>>;
  try {
    result = await limits.perIp.consume(budgetKey(state.ip));
  } catch (err) {
    throw asOAuthError(err, "client");
  }
  if (!result.allowed) throw asOAuthError(rateLimitedError(result), "client");
  state.rateLimit = result;
}
