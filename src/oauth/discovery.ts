import type { IncomingHttpHeaders } from "node:http";
import { GRANT_TYPES } from "./token.js";

/** The paths of the OAuth 2.0 endpoints (the issuer's origin and path before them). */
export const OAUTH_PATHS = {
  token: "/oauth2/token",
  revocation: "/oauth2/revoke",
  introspection: "/oauth2/introspect",
  discovery: "/.well-known/oauth-authorization-server",
  jwks: "/.well-known/jwks.json",
} as const;

/** The client authentication methods every OAuth endpoint accepts (RFC 7591 names). */
export const CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "tls_client_auth"] as const;

/**
 * What each endpoint accepts besides: `none`, a public client, where a user's session
 * refreshes (the refresh_token grant) and revokes its refresh token (revoke.ts);
 * `Bearer`, any bearer credential of the caller's, at introspection. RFC 8414 §2 lets only
 * introspection name an access token type: revocation, which takes a bearer too
 * (form.ts `tokenRequest`), cannot say so there.
 */
const AUTH_METHODS = {
  token: [...CLIENT_AUTH_METHODS, "none"],
  revocation: [...CLIENT_AUTH_METHODS, "none"],
  introspection: [...CLIENT_AUTH_METHODS, "Bearer"],
} as const;

const HOST_RE = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$/;

/**
 * The issuer identifier (RFC 8414 §2): `auth.oauth.issuer` when configured; else the
 * request's own `https://host` (its `:authority` or Host, when it is a plain host[:port]),
 * which is right for a server reached at one address and wrong behind a proxy that
 * rewrites it (configure the issuer there). Undefined when neither gives one.
 */
export function issuerOf(
  configured: string | undefined,
  headers: IncomingHttpHeaders,
  tls: boolean,
): string | undefined {
  if (configured !== undefined) return configured.replace(/\/+$/, "");
  const host = headers[":authority"] ?? headers.host;
  if (typeof host !== "string" || !HOST_RE.test(host)) return undefined;
  return `${tls ? "https" : "http"}://${host}`;
}

/**
 * The authorization server metadata (RFC 8414 §2) of `issuer`: the endpoints, the grants
 * and client authentication methods each endpoint accepts, and that access tokens issued
 * over mTLS are bound to the client certificate (RFC 8705 §3.3). `jwks_uri` only when
 * `publishesKeys`: signing with a shared secret (HS256) publishes no key, and a key set that
 * is always empty (what /.well-known/jwks.json then serves) is no key set to point at. No
 * authorization endpoint: Tessera issues tokens to machines and to sessions opened by
 * Login, never through a browser redirect, hence no response types.
 */
export function discoveryDocument(issuer: string, publishesKeys: boolean): Record<string, unknown> {
  return {
    issuer,
    token_endpoint: issuer + OAUTH_PATHS.token,
    ...(publishesKeys ? { jwks_uri: issuer + OAUTH_PATHS.jwks } : {}),
    revocation_endpoint: issuer + OAUTH_PATHS.revocation,
    introspection_endpoint: issuer + OAUTH_PATHS.introspection,
    grant_types_supported: [...GRANT_TYPES],
    response_types_supported: [],
    token_endpoint_auth_methods_supported: [...AUTH_METHODS.token],
    revocation_endpoint_auth_methods_supported: [...AUTH_METHODS.revocation],
    introspection_endpoint_auth_methods_supported: [...AUTH_METHODS.introspection],
    tls_client_certificate_bound_access_tokens: true,
  };
}
