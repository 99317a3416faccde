import { describe, expect, it } from "vitest";
import { hasAllScopes, hasScope, intersectScopes, isValidScope, scopeCovers } from "../src/auth/scopes.js";

describe("scope matching", () => {
  it("matches an exact scope", () => {
    expect(scopeCovers("cluster:read", "cluster:read")).toBe(true);
    expect(scopeCovers("cluster:read", "cluster:write")).toBe(false);
  });
  it("lets ns:* grant every scope in its namespace and nothing else", () => {
    expect(scopeCovers("admin:*", "admin:users")).toBe(true);
    expect(scopeCovers("admin:*", "admin:tokens")).toBe(true);
    expect(scopeCovers("admin:*", "cluster:read")).toBe(false);
    expect(scopeCovers("admin:*", "administrator:x")).toBe(false);
  });
  it("lets * grant everything", () => {
    expect(hasAllScopes(["*"], ["admin:users", "swarm:deploy"])).toBe(true);
  });
  it("requires every required scope", () => {
    expect(hasAllScopes(["cluster:read"], ["cluster:read", "cluster:write"])).toBe(false);
    expect(hasAllScopes([], [])).toBe(true);
    expect(hasScope([], "cluster:read")).toBe(false);
  });
  it("intersects requested scopes with granted ones", () => {
    expect(
      intersectScopes(["cluster:read", "swarm:deploy", "admin:users"], ["cluster:*", "admin:users"]),
    ).toEqual(["cluster:read", "admin:users"]);
  });
  it("validates scope syntax", () => {
    for (const ok of ["*", "admin:*", "cluster:read", "machine-users:write"])
      expect(isValidScope(ok)).toBe(true);
    for (const bad of ["", "admin", "Admin:read", "a:b:c", "*:*", "cluster:", " cluster:read"])
      expect(isValidScope(bad)).toBe(false);
  });
});
