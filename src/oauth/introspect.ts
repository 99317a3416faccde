import type { IncomingMessage, ServerResponse } from "node:http";
import type * as http2 from "node:http2";
import { Code } from "@connectrpc/connect";
import { codeToHttpStatus } from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import { VerificationService } from "../../gen/tessera/v1/verification_service_pb.js";
import { type AdmissionDeps, admit } from "../admission/index.js";
import type { HeaderSource } from "../auth/credentials.js";
import type { RequestState } from "../context.js";
import { addChallenge, REASONS, TesseraError } from "../errors.js";
import { driverErrorAsTesseraError, loggableError } from "../storage/errors.js";
import type { CredentialVerifier, Verification } from "../verification/verify-credential.js";

/** The path of RFC 7662 token introspection. */
export const INTROSPECTION_PATH = "/oauth2/introspect";

type Request = IncomingMessage | http2.Http2ServerRequest;
type Response = ServerResponse | http2.Http2ServerResponse;

/** Dependencies of {@link createIntrospectionEndpoint}. */
export interface IntrospectionDeps {
  /** Admission of the client, by VerifyCredential's rule (`auth:verify`, machine principals). */
  admission: AdmissionDeps;
  verifier: CredentialVerifier;
  /** `server.maxBodyBytes`: a longer form is refused unread. */
  maxBodyBytes: number;
  logger: Logger;
}

const FORM = "application/x-www-form-urlencoded";

/**
 * `POST /oauth2/introspect` (RFC 7662): whether a token is active, for a resource server.
 *
 * The client is admitted exactly as a VerifyCredential call (the same rule: a machine
 * principal, by its Basic pair, its bearer token or its bound client certificate alone,
 * holding `auth:verify`; the same per-IP limit and failed-authentication budgets), before
 * the body is read; a refused client gets 401 (with `WWW-Authenticate`), 403 or 429. The
 * token is then verified by the same core (src/verification/), audited the same way:
 * `{"active": false}` for every invalid token, whatever the reason (RFC 7662 §2.2). RATE_LIMITED
 * (the client's budget of failed verifications is spent) is 429, not an answer about the token.
 */
export function createIntrospectionEndpoint(
  deps: IntrospectionDeps,
): (req: Request, res: Response, state: RequestState, headers: HeaderSource) => void {
  const method = VerificationService.method.verifyCredential;
  return (req, res, state, headers) => {
    serve(req, res, state, headers).catch((err: unknown) => fault(res, state, err));
  };

  async function serve(req: Request, res: Response, state: RequestState, headers: HeaderSource) {
    if (req.method !== "POST") {
      res.setHeader("allow", "POST");
      return oauthError(res, 405, "invalid_request", "use POST");
    }
    const refusal = await admit(deps.admission, method, headers, state, undefined);
    if (refusal !== undefined) return refused(req, res, state, refusal);
    const contentType = (req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
    if (contentType !== FORM) return oauthError(res, 400, "invalid_request", `the body must be ${FORM}`);
    const body = await readBody(req, deps.maxBodyBytes);
    if (body === undefined) return oauthError(res, 413, "invalid_request", "the body is too large");
    const form = new URLSearchParams(body);
    const tokens = form.getAll("token");
    // RFC 6749 §3.1: a parameter sent twice is a malformed request.
    if (tokens.length !== 1 || tokens[0] === "" || form.getAll("token_type_hint").length > 1)
      return oauthError(res, 400, "invalid_request", "send exactly one token");
    // token_type_hint is only a hint (RFC 7662 §2.1): every kind is recognised by its shape.
    const verification = await deps.verifier.verify(state.principal!, state, { credential: tokens[0]! });
    if (verification.code === "RATE_LIMITED") {
      res.setHeader("retry-after", String(verification.retryAfterSeconds ?? 1));
      return oauthError(res, 429, "slow_down", "too many tokens that did not verify; retry later");
    }
    json(res, 200, introspection(verification));
  }

  /** The client's own refusal by admission. */
  function refused(req: Request, res: Response, state: RequestState, refusal: unknown) {
    const err = driverErrorAsTesseraError(refusal) ?? refusal;
    if (!(err instanceof TesseraError) || err.code === Code.Internal || err.code === Code.Unavailable)
      return fault(res, state, err);
    const headers = { ...state.responseHeaders, ...err.headers };
    if (err.code === Code.Unauthenticated) {
      // RFC 6749 §5.2: the challenge of the scheme the client used.
      const basic = (req.headers.authorization ?? "").trim().toLowerCase().startsWith("basic ");
      headers["www-authenticate"] = basic
        ? 'Basic realm="tessera"'
        : (addChallenge({}, err.code, err.reason, err.message)["www-authenticate"] ??
          'Bearer realm="tessera"');
    } else addChallenge(headers, err.code, err.reason, err.message);
    for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
    const error =
      err.code === Code.Unauthenticated
        ? "invalid_client"
        : err.code === Code.PermissionDenied
          ? "insufficient_scope"
          : err.code === Code.ResourceExhausted
            ? "slow_down"
            : "invalid_request";
    oauthError(res, codeToHttpStatus(err.code), error, err.message, err.reason);
  }

  /** A fault: 503 with Retry-After when storage is away, else 500 (logged). */
  function fault(res: Response, state: RequestState, err: unknown) {
    if (res.headersSent) return;
    const e = driverErrorAsTesseraError(err) ?? err;
    if (e instanceof TesseraError && e.code === Code.Unavailable) {
      res.setHeader("retry-after", e.headers["retry-after"] ?? "1");
      return oauthError(res, 503, "temporarily_unavailable", e.message, e.reason);
    }
    deps.logger.error({ err: loggableError(err), requestId: state.requestId }, "introspection failed");
    oauthError(res, 500, "server_error", "internal error", "INTERNAL");
  }
}

/** RFC 7662 §2.2: the members of an active token's answer; `{"active": false}` for any other. */
export function introspection(v: Verification): Record<string, unknown> {
  const p = v.principal;
  if (!v.valid || p === undefined) return { active: false };
  const answer: Record<string, unknown> = {
    active: true,
    scope: p.scopes.join(" "),
    sub: p.id,
    token_type: v.credentialKind === "basic" ? "Basic" : "Bearer",
    tenant_id: p.tenantId,
  };
  if (p.kind === "machine") answer.client_id = p.id;
  if (p.username !== undefined) answer.username = p.username;
  if (p.expiresAt !== undefined && p.expiresAt !== null) answer.exp = Math.floor(p.expiresAt / 1000);
  if (p.issuedAt !== undefined) answer.iat = Math.floor(p.issuedAt / 1000);
  if (p.certificateBinding !== undefined) answer.cnf = { "x5t#S256": p.certificateBinding };
  return answer;
}

function json(res: Response, status: number, body: unknown): void {
  res.statusCode = status;
  res.setHeader("content-type", "application/json");
  // RFC 7662 §2.2 / RFC 6749 §5.1: never cached.
  res.setHeader("cache-control", "no-store");
  res.setHeader("pragma", "no-cache");
  res.end(JSON.stringify(body));
}

function oauthError(res: Response, status: number, error: string, description: string, code?: string) {
  json(res, status, {
    error,
    error_description: description.replace(/[^\x20-\x21\x23-\x5b\x5d-\x7e]/g, ""),
    ...(code !== undefined && code in REASONS ? { code } : {}),
  });
}

/** The body as text, or undefined past `max` bytes (the rest is not read). */
async function readBody(req: Request, max: number): Promise<string | undefined> {
  const declared = Number(req.headers["content-length"] ?? "0");
  if (declared > max) return undefined;
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > max) return undefined;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}
