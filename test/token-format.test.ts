import { describe, expect, it } from "vitest";
import { generateToken, parseToken, tokenHint } from "../src/auth/token-format.js";

describe("opaque token format", () => {
  it("round-trips a generated token", () => {
    const t = generateToken("tsr_pat_");
    expect(t.token.startsWith("tsr_pat_")).toBe(true);
    expect(parseToken(t.token, ["tsr_key_", "tsr_pat_"])).toEqual({
      prefix: "tsr_pat_",
      id: t.id,
      secret: t.secret,
    });
  });

  it("carries at least 128 bits of randomness in the secret and never repeats", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 200; i++) seen.add(generateToken("p_").secret);
    expect(seen.size).toBe(200);
    // 32 base62 characters = 32 * log2(62) ≈ 190 bits.
    expect(generateToken("p_").secret).toHaveLength(32);
  });

  it("rejects a one-character typo by checksum", () => {
    const { token } = generateToken("tsr_key_");
    const i = 20;
    const typo = token.slice(0, i) + (token[i] === "a" ? "b" : "a") + token.slice(i + 1);
    expect(parseToken(typo, ["tsr_key_"])).toBe("malformed");
    expect(parseToken(token.slice(0, -1), ["tsr_key_"])).toBe("malformed");
    expect(parseToken(`${token}x`, ["tsr_key_"])).toBe("malformed");
  });

  it("ignores tokens of other prefixes", () => {
    expect(parseToken(generateToken("m9m_sk_").token, ["tsr_pat_"])).toBeNull();
  });

  it("shows only the prefix and last four characters as a hint", () => {
    const { token } = generateToken("pfy_");
    const hint = tokenHint(token, "pfy_");
    expect(hint).toBe(`pfy_…${token.slice(-4)}`);
    expect(hint).not.toContain(token.slice(4, 20));
  });
});
