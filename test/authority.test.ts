import { describe, expect, it } from "vitest";
import { assertMayManage, NEW_PRINCIPAL } from "../src/auth/authority.js";
import type { Principal } from "../src/auth/principal.js";
import { TesseraError } from "../src/errors.js";

const caller = (...scopes: string[]): Principal => ({
  kind: "user",
  method: "jwt",
  id: "c",
  tenantId: "t",
  scopes,
});

/** The reason assertMayManage refuses with, or "ok". */
function outcome(p: Principal, target: readonly string[], resulting?: readonly string[]): string {
  try {
    assertMayManage(p, { scopes: target }, resulting);
    return "ok";
  } catch (err) {
    if (err instanceof TesseraError) return err.reason;
    throw err;
  }
}

describe("assertMayManage", () => {
  it("manages a target holding * only for a caller holding *", () => {
    expect(outcome(caller("admin:*", "cluster:*"), ["*"])).toBe("ACCESS_DENIED");
    expect(outcome(caller("*"), ["*"])).toBe("ok");
  });

  it("needs every current scope of the target covered, with namespace wildcards", () => {
    expect(outcome(caller("admin:users"), ["admin:users", "cluster:read"])).toBe("ACCESS_DENIED");
    expect(outcome(caller("admin:*", "cluster:read"), ["admin:users", "cluster:read"])).toBe("ok");
    // "admin:*" covers "admin:x" but not a target holding the wildcard itself unless equal.
    expect(outcome(caller("admin:users"), ["admin:*"])).toBe("ACCESS_DENIED");
    expect(outcome(caller("admin:*"), ["admin:*"])).toBe("ok");
  });

  it("needs every resulting scope covered too, even on a target holding nothing", () => {
    expect(outcome(caller("admin:users"), [], ["cluster:write"])).toBe("ACCESS_DENIED");
    expect(outcome(caller("admin:users"), [], ["*"])).toBe("ACCESS_DENIED");
    expect(outcome(caller("admin:users", "cluster:write"), [], ["cluster:write"])).toBe("ok");
  });

  it("refuses a malformed resulting scope as InvalidArgument before anything else", () => {
    expect(outcome(caller("*"), [], ["not a scope"])).toBe("INVALID_ARGUMENT");
  });

  it("lets any caller create a principal that holds nothing", () => {
    expect(() => assertMayManage(caller(), NEW_PRINCIPAL, [])).not.toThrow();
  });
});
