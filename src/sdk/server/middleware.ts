import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { ONE_AUTHORIZATION } from "../../auth/repeated-authorization.js";
import { refusalOf, TesseraAuthError } from "./errors.js";
import {
  clientCertificateThumbprint,
  connectionOf,
  peerAddressOf,
  repeatsAuthorization,
  type TesseraPrincipal,
} from "./principal.js";
import { createTesseraAuth, type TesseraAuth, type TesseraAuthOptions } from "./tessera-auth.js";
import type { DownstreamRule } from "./verdicts.js";

/** node:http's request, or HTTP/2's compatibility one (Fastify with `http2: true`, node:http2 servers). */
export type TesseraMiddlewareRequest = IncomingMessage | Http2ServerRequest;
/** node:http's response, or HTTP/2's compatibility one. */
export type TesseraMiddlewareResponse = ServerResponse | Http2ServerResponse;

/** Options of {@link createTesseraAuthMiddleware}. */
export interface TesseraMiddlewareOptions<Req extends TesseraMiddlewareRequest = IncomingMessage> {
  /**
   * The rule of a request: fixed, or per request. `undefined` (or `null`) from the function
   * means no rule: the request is refused (fail closed). Mount one middleware per route
   * through your router rather than parsing `req.url` here: the router decides which handler
   * runs (case, `//`, `%2F`, trailing slashes, HEAD for GET), and a rule must see the same.
   */
  rule: DownstreamRule | ((req: Req) => DownstreamRule | undefined | null);
  /**
   * The address of the client that sent `req`, sent to VerifyCredential with its
   * credentials so that a client sending bad ones spends a budget of its own at Tessera
   * (default: the connection's peer address). Behind a proxy of your own, the address it
   * forwards (Express's `req.ip` with `trust proxy` set); undefined: none sent.
   */
  clientAddress?: (req: Req) => string | undefined;
}

const principals = new WeakMap<object, TesseraPrincipal>();

/** The principal the middleware admitted `req` as (also at `req.tesseraPrincipal`). */
export function principalOf(req: object): TesseraPrincipal | undefined {
  return principals.get(req);
}

/** A plain Node middleware, with the core it runs on. */
export type TesseraAuthMiddleware<Req extends TesseraMiddlewareRequest = IncomingMessage> = ((
  req: Req,
  res: TesseraMiddlewareResponse,
  next: (err?: unknown) => void,
) => void) & { readonly auth: TesseraAuth };

function refuse(res: TesseraMiddlewareResponse, err: TesseraAuthError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = JSON.stringify({
    ok: false,
    error:
      err.status === 401
        ? "Unauthorized"
        : err.status === 403
          ? "Forbidden"
          : err.status === 429
            ? "Too Many Requests"
            : err.status === 500
              ? "Internal Server Error"
              : "Service Unavailable",
    reason: err.reason,
    message: err.message,
  });
  res.writeHead(err.status, {
    ...err.headers(),
    "content-type": "application/json",
    "content-length": Buffer.byteLength(body),
    "cache-control": "no-store",
  });
  res.end(body);
}

/**
 * `(req, res, next)` on the same core as the interceptor, for node:http and node:http2,
 * Express, or Fastify (an `onRequest` hook on `request.raw`, `reply.raw` and its `done`, over
 * HTTP/1.1 or HTTP/2; see the SDK's README): the call's principal is put at
 * `req.tesseraPrincipal` (and {@link principalOf}) and `next()` runs; a refusal is answered
 * here as JSON (`reason` as Tessera's, WWW-Authenticate, Retry-After on 503) and `next` is
 * not called. A verified client certificate on the socket is used for bound credentials.
 * A request is admitted once, when it arrives: a response the handler keeps open (server-sent
 * events, a long poll) is not ended when the credential is revoked later. Serve long-lived
 * streams through the interceptor (which holds them), or end them yourself.
 */
export function createTesseraAuthMiddleware<Req extends TesseraMiddlewareRequest = IncomingMessage>(
  auth: TesseraAuthOptions | TesseraAuth,
  options: TesseraMiddlewareOptions<Req>,
): TesseraAuthMiddleware<Req> {
  const core = "authenticate" in auth ? auth : createTesseraAuth(auth);
  // A TesseraAuthError as it is; anything else failed outside the credential check: reported
  // (aggregated) and answered 500, never the retryable 503 of Tessera's faults.
  const refused = (err: unknown) => refusalOf(err, (e) => core.reportBug(e));
  const middleware = (req: Req, res: TesseraMiddlewareResponse, next: (err?: unknown) => void): void => {
    let rule: DownstreamRule | undefined | null;
    try {
      rule = typeof options.rule === "function" ? options.rule(req) : options.rule;
    } catch (err) {
      next(err);
      return;
    }
    // null too: a plain-JavaScript rule function's "none" must refuse, not throw past here.
    if (rule === undefined || rule === null || typeof rule !== "object") {
      refuse(res, new TesseraAuthError("ACCESS_DENIED", "no auth rule for this request"));
      return;
    }
    if (rule.public) {
      next();
      return;
    }
    const header = req.headers.authorization;
    if (repeatsAuthorization(req)) {
      refuse(res, new TesseraAuthError("AUTH_HEADER_MALFORMED", ONE_AUTHORIZATION));
      return;
    }
    const admit = (principal: TesseraPrincipal) => {
      core.authorize(principal, rule);
      principals.set(req, principal);
      (req as Req & { tesseraPrincipal?: TesseraPrincipal }).tesseraPrincipal = principal;
    };
    let thumbprint: string | undefined;
    let known: TesseraPrincipal | undefined;
    try {
      thumbprint = clientCertificateThumbprint(
        connectionOf(req as { socket?: unknown; stream?: { session?: { socket?: unknown } } }),
      );
      // A header admitted before is answered synchronously, without a promise.
      known = core.admitted(header, thumbprint);
      if (known !== undefined) admit(known);
    } catch (err) {
      refuse(res, refused(err));
      return;
    }
    // Outside the try: what the chain throws goes to whoever called the middleware, as without it.
    if (known !== undefined) {
      next();
      return;
    }
    let address: string | undefined;
    try {
      address = options.clientAddress ? options.clientAddress(req) : peerAddressOf(req as never);
    } catch (err) {
      next(err);
      return;
    }
    core.authenticate(header, thumbprint, address).then(
      (principal) => {
        try {
          admit(principal);
        } catch (err) {
          refuse(res, refused(err));
          return;
        }
        try {
          next();
        } catch (err) {
          // Called from our promise, nothing above it catches what the chain throws (a
          // framework catches its handlers' errors; node:http's `next`, the handler itself,
          // does not): a failure of the application's, answered 500 and reported, not 503.
          refuse(res, refused(err));
        }
      },
      (err: unknown) => refuse(res, refused(err)),
    );
  };
  return Object.assign(middleware, { auth: core });
}
