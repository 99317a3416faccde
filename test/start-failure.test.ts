import { UniqueConstraintViolationException } from "@mikro-orm/core";
import { describe, expect, it } from "vitest";
import { describeFailure } from "../src/cli/program.js";

describe("the line a failed command prints", () => {
  it("names a database driver error by class, code and constraint, never its SQL values", () => {
    const driver = Object.assign(new Error("insert into users values ('pbkdf2-sha256$100000$salt$hash')"), {
      code: "23505",
      constraint: "users_username_unique",
    });
    const err = new UniqueConstraintViolationException(driver);
    const line = describeFailure(err);
    expect(line).toBe("database error: UniqueConstraintViolationException (23505, users_username_unique)");
    expect(line).not.toContain("pbkdf2");
  });

  it("keeps the message of any other error", () => {
    expect(describeFailure(new Error("cannot listen on 127.0.0.1:1: address already in use"))).toBe(
      "cannot listen on 127.0.0.1:1: address already in use",
    );
  });
});
