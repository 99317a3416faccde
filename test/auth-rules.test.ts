import { getOption, hasOption } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { ServerReflection } from "../gen/grpc/reflection/v1/reflection_pb.js";
import { auth } from "../gen/tessera/v1/options_pb.js";
import { assertAuthRules, authRuleFor } from "../src/admission/auth-rule.js";
import type { App } from "../src/app.js";
import { createTestApp, SQLITE } from "./helpers.js";

describe("auth rules in the proto", () => {
  let app: App;
  beforeAll(async () => {
    app = await createTestApp(SQLITE);
  });
  afterAll(async () => {
    await app.close();
  });

  it("gives every RPC of every served tessera service an auth rule that admits someone", () => {
    expect(app.services.length).toBeGreaterThan(0);
    for (const service of app.services) {
      for (const method of service.methods) {
        expect(hasOption(method, auth), `${service.typeName}.${method.name} has no (tessera.v1.auth)`).toBe(
          true,
        );
        const rule = getOption(method, auth);
        expect(
          rule.public || rule.principals.length > 0,
          `${service.typeName}.${method.name} admits nobody`,
        ).toBe(true);
      }
    }
  });

  it("puts every administrative RPC behind an admin: scope", () => {
    for (const service of app.services) {
      for (const method of service.methods) {
        const rule = getOption(method, auth);
        if (/^(Create|Update|Delete|List)User/.test(method.name) || method.name === "GetUser") {
          expect(rule.scopes.some((s) => s.startsWith("admin:"))).toBe(true);
        }
      }
    }
  });

  it("audits exactly the RPCs the name rule it replaced audited: every one not named Get…, List… or Check…", () => {
    // The rule `audit` replaced (src/interceptors/audit.ts until issue #19): nothing that
    // was audited stops being so, and no read starts being written.
    const byName = (name: string) => !/^(Get|List|Check)/.test(name);
    // Newer than the name rule, with their own audit record: VerifyCredential writes each
    // verification as `credential.verify` with its code (src/verification/), not as the call.
    // WatchRevocations is a read newer than the rule (a stream of ids, written nowhere).
    const ownRecord = new Set([
      "tessera.v1.VerificationService/VerifyCredential",
      "tessera.v1.VerificationService/WatchRevocations",
    ]);
    const audited: string[] = [];
    for (const service of app.services)
      for (const method of service.methods) {
        const name = `${service.typeName}/${method.name}`;
        if (ownRecord.has(name)) {
          expect(authRuleFor(method).audit, name).toBe(false);
          continue;
        }
        expect(authRuleFor(method).audit, name).toBe(byName(method.name));
        if (authRuleFor(method).audit) audited.push(name);
      }
    expect(audited).toContain("tessera.v1.UserService/Login");
    expect(audited).toContain("tessera.v1.MachineUserService/IssueAccessToken");
    expect(audited).not.toContain("tessera.v1.MachineUserService/CheckAuthentication");
  });

  it("audits no call of the standard gRPC services (health, reflection): they change nothing", () => {
    for (const service of [Health, ServerReflection])
      for (const method of service.methods) expect(authRuleFor(method).audit).toBe(false);
  });

  it("refuses to start with a method that has no rule", () => {
    const fake = {
      typeName: "tessera.v1.Fake",
      methods: [{ name: "Nope", parent: { typeName: "tessera.v1.Fake" }, proto: { options: undefined } }],
    };
    // biome-ignore lint/suspicious/noExplicitAny: a hand-built descriptor without options
    expect(() => assertAuthRules([fake as any])).toThrow(/tessera.v1.Fake.Nope/);
  });
});
