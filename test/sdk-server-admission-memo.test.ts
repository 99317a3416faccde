import { describe, expect, it } from "vitest";
import { AdmissionMemo, type Memo } from "../src/sdk/server/admission-memo.js";
import type { TesseraPrincipal } from "../src/sdk/server/principal.js";

/** The memo of admissions by exact Authorization header (the interceptor's synchronous hits). */

const principal = (id: string): TesseraPrincipal => ({
  id,
  kind: "user",
  tenantId: "t",
  scopes: [],
  credentialKind: "jwt",
  credentialId: id,
  applicationIds: [],
});
const memo = (id: string, over: Partial<Memo> = {}): Memo => ({
  principal: principal(id),
  epoch: 1,
  keySet: 1,
  until: 1000,
  offline: true,
  ...over,
});

describe("AdmissionMemo", () => {
  it("answers only the exact header, even one sharing its length and last characters", () => {
    const m = new AdmissionMemo(10);
    const tail = "x".repeat(40);
    m.set(`Bearer a${tail}`, memo("a"));
    expect(m.get(`Bearer a${tail}`, 1, 1, 0)?.principal.id).toBe("a");
    // Same length, same fingerprinted tail: never the other header's principal.
    expect(m.get(`Bearer b${tail}`, 1, 1, 0)).toBeUndefined();
    m.set(`Bearer b${tail}`, memo("b"));
    expect(m.get(`Bearer b${tail}`, 1, 1, 0)?.principal.id).toBe("b");
    expect(m.get(`Bearer a${tail}`, 1, 1, 0)).toBeUndefined();
    expect(m.get(`Bearer a${tail.slice(1)}`, 1, 1, 0)).toBeUndefined();
  });

  it("forgets an admission once the epoch or key set moves, or at until by the caller's clock", () => {
    const m = new AdmissionMemo(10);
    m.set("Bearer one", memo("1"));
    expect(m.get("Bearer one", 2, 1, 0)).toBeUndefined();
    // Dropped, not only skipped: the old epoch does not bring it back.
    expect(m.get("Bearer one", 1, 1, 0)).toBeUndefined();
    m.set("Bearer one", memo("1"));
    expect(m.get("Bearer one", 1, 2, 0)).toBeUndefined();
    m.set("Bearer one", memo("1"));
    expect(m.get("Bearer one", 1, 1, 999)?.principal.id).toBe("1");
    expect(m.get("Bearer one", 1, 1, 1000)).toBeUndefined();
  });

  it("holds at most max admissions, the oldest out first, and none with max 0", () => {
    const m = new AdmissionMemo(3);
    for (let i = 0; i < 5; i++) m.set(`Bearer token-${i}`, memo(String(i)));
    expect(m.size).toBe(3);
    expect(m.get("Bearer token-0", 1, 1, 0)).toBeUndefined();
    expect(m.get("Bearer token-1", 1, 1, 0)).toBeUndefined();
    for (const i of [2, 3, 4]) expect(m.get(`Bearer token-${i}`, 1, 1, 0)?.principal.id).toBe(String(i));
    const none = new AdmissionMemo(0);
    none.set("Bearer x", memo("x"));
    expect(none.size).toBe(0);
    expect(none.get("Bearer x", 1, 1, 0)).toBeUndefined();
  });
});
