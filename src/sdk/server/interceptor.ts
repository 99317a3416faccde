import { type DescMethod, getOption, hasOption } from "@bufbuild/protobuf";
import type { Interceptor, StreamRequest, StreamResponse } from "@connectrpc/connect";
import { auth as authOption } from "../../../gen/tessera/v1/options_pb.js";
import { ONE_AUTHORIZATION } from "../../auth/repeated-authorization.js";
import { refusalOf, TesseraAuthError, toConnectError } from "./errors.js";
import {
  authorizationRepeatedKey,
  clientAddressKey,
  clientCertificateEndKey,
  clientCertificateKey,
  type TesseraPrincipal,
  tesseraPrincipalKey,
} from "./principal.js";
import type { StreamHold } from "./stream-holds.js";
import { createTesseraAuth, type TesseraAuth, type TesseraAuthOptions } from "./tessera-auth.js";
import type { DownstreamRule } from "./verdicts.js";

const rules = new WeakMap<DescMethod, DownstreamRule | null>();

/**
 * The standard gRPC services public without a rule of their own. Named one by one: a
 * downstream's own package may start with `grpc.` too, and channelz tells internals.
 */
const STANDARD_PUBLIC = new Set([
  "grpc.health.v1.Health",
  "grpc.reflection.v1.ServerReflection",
  "grpc.reflection.v1alpha.ServerReflection",
]);

/**
 * The rule of a method: its `(tessera.v1.auth)` option, read once from the descriptor (by
 * field number, so a downstream's own generated copy of tessera/v1/options.proto is read
 * alike). Without the option, the standard health and reflection services are public and
 * any other method has no rule (null), and is refused.
 */
export function ruleOf(method: DescMethod): DownstreamRule | null {
  let rule = rules.get(method);
  if (rule !== undefined) return rule;
  if (hasOption(method, authOption)) {
    const r = getOption(method, authOption);
    rule = { public: r.public, scopes: r.scopes, principals: r.principals };
  } else if (STANDARD_PUBLIC.has(method.parent.typeName)) rule = { public: true };
  else rule = null;
  rules.set(method, rule);
  return rule;
}

/**
 * Run a held stream: the handler's signal is aborted and both directions' messages throw
 * the refusal (a ConnectError: Unauthenticated, PermissionDenied or Unavailable, as a new
 * call would get) once the hold's signal is; the hold is released when the stream ends.
 */
async function held(
  next: (req: StreamRequest) => Promise<StreamResponse>,
  req: StreamRequest,
  hold: StreamHold,
): Promise<StreamResponse> {
  const release = () => hold.release();
  // The call's end, however it comes (a client gone before the first message included).
  req.signal.addEventListener("abort", release, { once: true });
  try {
    const signal = AbortSignal.any([req.signal, hold.signal]);
    // Raced too: a client-streaming handler's response is awaited inside next().
    const res = await untilEnded(
      next({ ...req, signal, message: guarded(req.message, hold.signal) }),
      hold.signal,
    );
    return { ...res, message: guarded(res.message, hold.signal, release) };
  } catch (err) {
    release();
    throw err;
  }
}

/** `p`, or the hold's refusal as a ConnectError once its signal aborts, whichever first. */
function untilEnded<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => {});
    return Promise.reject(toConnectError(signal.reason));
  }
  return new Promise<T>((resolve, reject) => {
    const ended = () => reject(toConnectError(signal.reason));
    signal.addEventListener("abort", ended, { once: true });
    p.then(
      (value) => {
        signal.removeEventListener("abort", ended);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener("abort", ended);
        reject(err);
      },
    );
  });
}

/** The messages of `source`, until the hold ends (then its refusal is thrown); `done` when they stop. */
async function* guarded<T>(
  source: AsyncIterable<T>,
  signal: AbortSignal,
  done?: () => void,
): AsyncGenerator<T> {
  const it = source[Symbol.asyncIterator]();
  let finished = false;
  try {
    for (;;) {
      const r = await untilEnded(it.next(), signal);
      if (r.done) {
        finished = true;
        return;
      }
      yield r.value;
    }
  } finally {
    done?.();
    // Ended early (refused, or the consumer left): the source is told, not awaited, as a
    // handler that ignores its signal would hold the call's end.
    if (!finished) Promise.resolve(it.return?.()).catch(() => {});
  }
}

/** The interceptor, with the core it runs on (to share with a middleware, read stats, close). */
export type TesseraAuthInterceptor = Interceptor & { readonly auth: TesseraAuth };

/**
 * A Connect interceptor protecting any connect-node service with Tessera:
 * `connectNodeAdapter({ routes, interceptors: [createTesseraAuthInterceptor({ server, certFolder, credential })], contextValues: tesseraContextValues })`.
 *
 * Each method's scopes come from its own `option (tessera.v1.auth) = { scopes: [...] }`;
 * `public: true` lets anyone in; a method without the option is refused (fail closed). The
 * principal is in the handler's context under {@link tesseraPrincipalKey}. The client's
 * address ({@link clientAddressKey}, which `tesseraContextValues` sets) goes to
 * VerifyCredential with the credentials it presents. Refusals carry
 * Tessera's error model: Unauthenticated or PermissionDenied with a reason in a
 * `google.rpc.ErrorInfo`, Unavailable with Retry-After when Tessera cannot answer.
 *
 * A streaming method (server, client or bidi) stays admitted only while its credential
 * does: once a revocation names its credential, session, subject or tenant, once the
 * credential expires, or once the revocation watch that vouched for it is lost and Tessera
 * refuses it (or cannot answer), the handler's `signal` is aborted and the stream ends with
 * the error a new call would get. Unary calls are admitted once, as before.
 */
export function createTesseraAuthInterceptor(
  options: TesseraAuthOptions | TesseraAuth,
): TesseraAuthInterceptor {
  const auth = "authenticate" in options ? options : createTesseraAuth(options);
  // A TesseraAuthError as it is; anything else failed outside the credential check: reported
  // (aggregated) and answered Internal, never the retryable Unavailable of Tessera's faults.
  const refused = (err: unknown) => toConnectError(refusalOf(err, (e) => auth.reportBug(e)));
  const interceptor: Interceptor = (next) => (req) => {
    let rule: DownstreamRule | null;
    let authorization: string | undefined;
    let thumbprint: string | undefined;
    let known: TesseraPrincipal | undefined;
    // Everything of ours before the call runs: what throws here is answered by us, not left
    // to Connect (which answers an unknown error with its message).
    try {
      rule = ruleOf(req.method);
      if (rule === null) throw new TesseraAuthError("ACCESS_DENIED", "method has no auth rule");
      if (!rule.public) {
        if (req.contextValues.get(authorizationRepeatedKey))
          throw new TesseraAuthError("AUTH_HEADER_MALFORMED", ONE_AUTHORIZATION);
        authorization = req.header.get("authorization") ?? undefined;
        thumbprint = req.contextValues.get(clientCertificateKey);
        // A header admitted before is answered synchronously: no promise of ours on the way.
        if (!req.stream) known = auth.admitted(authorization, thumbprint);
        if (known !== undefined) {
          auth.authorize(known, rule);
          req.contextValues.set(tesseraPrincipalKey, known);
        }
      }
    } catch (err) {
      return Promise.reject(refused(err));
    }
    // The call's own failures (the handler's, the next interceptors') are the service's: as they are.
    if (rule.public || known !== undefined) return next(req);
    const admitted = rule;
    // A stream is not only admitted but held: it ends when its admission no longer holds.
    if (req.stream)
      return auth
        .holdStream(
          authorization,
          thumbprint,
          admitted,
          req.contextValues.get(clientAddressKey),
          req.contextValues.get(clientCertificateEndKey),
        )
        .then(
          (hold) => {
            try {
              req.contextValues.set(tesseraPrincipalKey, hold.principal);
            } catch (err) {
              hold.release();
              throw refused(err);
            }
            return held(next as (req: StreamRequest) => Promise<StreamResponse>, req, hold);
          },
          (err: unknown) => {
            throw refused(err);
          },
        );
    return auth.authenticate(authorization, thumbprint, req.contextValues.get(clientAddressKey)).then(
      (principal) => {
        try {
          auth.authorize(principal, admitted);
          req.contextValues.set(tesseraPrincipalKey, principal);
        } catch (err) {
          throw refused(err);
        }
        return next(req);
      },
      (err: unknown) => {
        throw refused(err);
      },
    );
  };
  return Object.assign(interceptor, { auth });
}
