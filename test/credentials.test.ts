import { describe, expect, it } from "vitest";
import { parseCredentials } from "../src/auth/credentials.js";
import { ONE_AUTHORIZATION, repeatedAuthorization } from "../src/auth/repeated-authorization.js";
import type { TesseraError } from "../src/errors.js";

const reasonOf = (fn: () => unknown) => {
  try {
    fn();
  } catch (err) {
    return (err as TesseraError).reason;
  }
  return "no error";
};

describe("credential parsing", () => {
  it("reads a bearer token, case-insensitively", () => {
    expect(parseCredentials(new Headers({ authorization: "bearer abc.def" }))).toEqual({
      type: "bearer",
      token: "abc.def",
    });
  });
  it("reads an X-API-Key", () => {
    expect(parseCredentials(new Headers({ "x-api-key": "tsr_key_x" }))).toEqual({
      type: "api-key",
      token: "tsr_key_x",
    });
  });
  it("reads Basic credentials with a colon in the password", () => {
    const h = new Headers({ authorization: `Basic ${Buffer.from("alice:pa:ss").toString("base64")}` });
    expect(parseCredentials(h)).toEqual({ type: "basic", username: "alice", password: "pa:ss" });
  });
  it("returns null when nothing was sent", () => {
    expect(parseCredentials(new Headers())).toBeNull();
  });
  it("refuses two credentials at once", () => {
    const h = new Headers({ authorization: "Bearer a", "x-api-key": "b" });
    expect(reasonOf(() => parseCredentials(h))).toBe("MULTIPLE_CREDENTIALS");
  });
  it("refuses malformed headers as AUTH_HEADER_MALFORMED", () => {
    for (const value of [
      "Bearer",
      "Bearer ",
      "Token abc",
      "abc",
      "Basic !!!",
      `Basic ${Buffer.from("nocolon").toString("base64")}`,
      "Bearer a, Bearer b",
    ]) {
      expect(reasonOf(() => parseCredentials(new Headers({ authorization: value })))).toBe(
        "AUTH_HEADER_MALFORMED",
      );
    }
  });
  it("finds a repeated Authorization header in Node's raw list, in any case, and refuses it joined", () => {
    const raw = (...names: string[]) => names.flatMap((name, i) => [name, `Bearer t${i}`]);
    expect(repeatedAuthorization(raw("host", "authorization", "accept"))).toBeUndefined();
    expect(repeatedAuthorization(raw("Authorization", "x-api-key", "AUTHORIZATION"))).toBe(
      "Bearer t0, Bearer t2",
    );
    expect(repeatedAuthorization(raw("authorization", "authorization", "authorization"))).toBe(
      "Bearer t0, Bearer t1, Bearer t2",
    );
    // Same length, another name (the letters' case bit alone decides).
    expect(repeatedAuthorization(raw("authorization", "authorizatioN", "authorizati0n"))).toBe(
      "Bearer t0, Bearer t1",
    );
    for (const joined of ["Bearer a, Bearer b", "Bearer a, Bearer a", "Basic YTpi, Basic YTpi"]) {
      const h = new Headers({ authorization: joined });
      expect(reasonOf(() => parseCredentials(h))).toBe("AUTH_HEADER_MALFORMED");
      expect(() => parseCredentials(h)).toThrow(ONE_AUTHORIZATION);
    }
    // A scheme whose own values hold ", " is refused as the scheme it is.
    expect(() => parseCredentials(new Headers({ authorization: 'Digest username="a", realm="b"' }))).toThrow(
      "unsupported Authorization scheme",
    );
  });
  it("parses a bearer header once: the same frozen credential for the same value, with every check kept", () => {
    const header = () => new Headers({ authorization: "Bearer kept.once.token" });
    const first = parseCredentials(header());
    expect(first).toEqual({ type: "bearer", token: "kept.once.token" });
    expect(parseCredentials(header())).toBe(first);
    expect(Object.isFrozen(first)).toBe(true);
    // What was kept for the value changes no other answer.
    const both = new Headers({ authorization: "Bearer kept.once.token", "x-api-key": "tsr_key_x" });
    expect(reasonOf(() => parseCredentials(both))).toBe("MULTIPLE_CREDENTIALS");
    expect(parseCredentials(new Headers({ authorization: "Bearer other.token" }))).toEqual({
      type: "bearer",
      token: "other.token",
    });
    // Past the bound (emptied, then filled again), every value still parses to its own token.
    for (let i = 0; i < 1500; i++) {
      const token = `t${i}.x.y`;
      expect(parseCredentials(new Headers({ authorization: `Bearer ${token}` }))).toEqual({
        type: "bearer",
        token,
      });
    }
    expect(parseCredentials(header())).toEqual({ type: "bearer", token: "kept.once.token" });
    expect(reasonOf(() => parseCredentials(new Headers({ authorization: "Bearer a, Bearer b" })))).toBe(
      "AUTH_HEADER_MALFORMED",
    );
  });
});
