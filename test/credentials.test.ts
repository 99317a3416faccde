import { describe, expect, it } from "vitest";
import { parseCredentials } from "../src/auth/credentials.js";
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
});
