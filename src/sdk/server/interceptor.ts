import { type DescMethod, getOption, hasOption } from "@bufbuild/protobuf";
import type { Interceptor } from "@connectrpc/connect";
import { auth as authOption } from "../../../gen/tessera/v1/options_pb.js";
import { TesseraAuthError, toConnectError } from "./errors.js";
import { clientCertificateKey, tesseraPrincipalKey } from "./principal.js";
import {
  createTesseraAuth,
  type DownstreamRule,
  type TesseraAuth,
  type TesseraAuthOptions,
} from "./tessera-auth.js";

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

/** The interceptor, with the core it runs on (to share with a middleware, read stats, close). */
export type TesseraAuthInterceptor = Interceptor & { readonly auth: TesseraAuth };

/**
 * A Connect interceptor protecting any connect-node service with Tessera:
 * `connectNodeAdapter({ routes, interceptors: [createTesseraAuthInterceptor({ server, certFolder, credential })], contextValues: tesseraContextValues })`.
 *
 * Each method's scopes come from its own `option (tessera.v1.auth) = { scopes: [...] }`;
 * `public: true` lets anyone in; a method without the option is refused (fail closed). The
 * principal is in the handler's context under {@link tesseraPrincipalKey}. Refusals carry
 * Tessera's error model: Unauthenticated or PermissionDenied with a reason in a
 * `google.rpc.ErrorInfo`, Unavailable with Retry-After when Tessera cannot answer.
 */
export function createTesseraAuthInterceptor(
  options: TesseraAuthOptions | TesseraAuth,
): TesseraAuthInterceptor {
  const auth = "authenticate" in options ? options : createTesseraAuth(options);
  const interceptor: Interceptor = (next) => (req) => {
    const rule = ruleOf(req.method);
    if (rule?.public) return next(req);
    if (rule === null)
      return Promise.reject(toConnectError(new TesseraAuthError("ACCESS_DENIED", "method has no auth rule")));
    const authorization = req.header.get("authorization") ?? undefined;
    const thumbprint = req.contextValues.get(clientCertificateKey);
    // A header admitted before is answered synchronously: no promise of ours on the way.
    const known = auth.admitted(authorization, thumbprint);
    if (known !== undefined) {
      try {
        auth.authorize(known, rule);
      } catch (err) {
        return Promise.reject(toConnectError(err));
      }
      req.contextValues.set(tesseraPrincipalKey, known);
      return next(req);
    }
    return auth.authenticate(authorization, thumbprint).then(
      (principal) => {
        try {
          auth.authorize(principal, rule);
        } catch (err) {
          throw toConnectError(err);
        }
        req.contextValues.set(tesseraPrincipalKey, principal);
        return next(req);
      },
      (err: unknown) => {
        throw toConnectError(err);
      },
    );
  };
  return Object.assign(interceptor, { auth });
}
