import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { create, getOption, hasOption } from "@bufbuild/protobuf";
import { type AuthRule, AuthRuleSchema, auth } from "../../gen/tessera/v1/options_pb.js";
import { admits, type Principal } from "../auth/principal.js";
import { hasAllScopes } from "../auth/scopes.js";
import { TesseraError, wwwAuthenticate } from "../errors.js";

const PUBLIC_RULE: AuthRule = create(AuthRuleSchema, { public: true });
const rules = new Map<DescMethod, AuthRule>();

/** Standard gRPC services we serve (health, reflection) are public by definition. */
function isStandardGrpcService(service: DescService): boolean {
  return service.typeName.startsWith("grpc.");
}

/**
 * The auth rule of a method, read once from its descriptor (the `tessera.v1.auth`
 * method option) and memoised. A tessera method without a rule fails closed.
 */
export function authRuleFor(method: DescMethod): AuthRule {
  let rule = rules.get(method);
  if (rule) return rule;
  if (isStandardGrpcService(method.parent)) rule = PUBLIC_RULE;
  else if (hasOption(method, auth)) rule = getOption(method, auth);
  else throw new TesseraError("ACCESS_DENIED", "method has no auth rule");
  rules.set(method, rule);
  return rule;
}

/** Refuse to start with a served method that lacks an auth rule (or admits nobody). */
export function assertAuthRules(services: readonly DescService[]): void {
  const problems: string[] = [];
  for (const service of services) {
    if (isStandardGrpcService(service)) continue;
    for (const method of service.methods) {
      if (!hasOption(method, auth)) {
        problems.push(`${service.typeName}.${method.name}: no (tessera.v1.auth) option`);
        continue;
      }
      const rule = getOption(method, auth);
      if (!rule.public && rule.principals.length === 0)
        problems.push(`${service.typeName}.${method.name}: admits no principal kind`);
    }
  }
  if (problems.length > 0) throw new Error(`auth rules missing:\n  ${problems.join("\n  ")}`);
}

/**
 * Whether `rule` admits `principal`: its kind must be one the rule names and its scopes
 * must cover every scope the rule requires. The one check of a rule, for RPCs (above) and
 * for the HTTP endpoints that stand for one (oauth/form.ts: VerifyCredential's).
 * @returns the refusal (PRINCIPAL_NOT_ALLOWED, ACCESS_DENIED), or undefined
 */
export function ruleRefusal(rule: AuthRule, principal: Principal): TesseraError | undefined {
  if (!rule.principals.some((kind) => admits(kind, principal))) {
    return new TesseraError(
      "PRINCIPAL_NOT_ALLOWED",
      `this method is not available to ${principal.kind} principals`,
    );
  }
  if (!hasAllScopes(principal.scopes, rule.scopes)) {
    return new TesseraError("ACCESS_DENIED", "Insufficient permissions", {
      headers: { "www-authenticate": wwwAuthenticate("ACCESS_DENIED", "", rule.scopes) },
      metadata: { required_scopes: rule.scopes.join(" ") },
    });
  }
  return undefined;
}
