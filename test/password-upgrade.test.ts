import { describe, expect, it } from "vitest";
import { hashSecret, parseHash, verifySecret } from "../src/auth/password.js";
import { PasswordUpgrader } from "../src/auth/password-upgrade.js";

const PASSWORD = "the user's password";

/** A logger that keeps what it is given. */
function recordingLogger() {
  const lines: { obj: object; msg: string }[] = [];
  return { lines, warn: (obj: object, msg: string) => lines.push({ obj, msg }) };
}

describe("PasswordUpgrader", () => {
  it("stores a hash of the password at the current iterations in place of an outdated one", async () => {
    const old = await hashSecret(PASSWORD, 1_000);
    const stored: [string, string][] = [];
    const upgrader = new PasswordUpgrader(1_200);
    await upgrader.upgrade("u1", PASSWORD, old, async (from, to) => {
      stored.push([from, to]);
      return true;
    });
    expect(stored).toHaveLength(1);
    expect(stored[0]![0]).toBe(old);
    expect(parseHash(stored[0]![1])!.iterations).toBe(1_200);
    expect(await verifySecret(PASSWORD, stored[0]![1])).toBe(true);
    expect(upgrader.stats()).toEqual({ upgraded: 1, deferred: 0, failed: 0 });
  });

  it("leaves a hash at the current iterations alone", async () => {
    const current = await hashSecret(PASSWORD, 1_000);
    let calls = 0;
    const upgrader = new PasswordUpgrader(1_000);
    await upgrader.upgrade("u1", PASSWORD, current, async () => {
      calls++;
      return true;
    });
    expect(calls).toBe(0);
    expect(upgrader.stats().upgraded).toBe(0);
  });

  it("never throws when the new hash cannot be stored: counts it and warns once per run, with no secret", async () => {
    const old = await hashSecret(PASSWORD, 1_000);
    const logger = recordingLogger();
    const upgrader = new PasswordUpgrader(1_200, logger);
    const failing = async (): Promise<boolean> => {
      throw new Error(`connection lost while writing ${old}`);
    };
    await expect(upgrader.upgrade("u1", PASSWORD, old, failing)).resolves.toBeUndefined();
    await expect(upgrader.upgrade("u2", PASSWORD, old, failing)).resolves.toBeUndefined();
    expect(upgrader.stats()).toEqual({ upgraded: 0, deferred: 0, failed: 2 });
    expect(logger.lines).toHaveLength(1);
    const text = JSON.stringify(logger.lines);
    expect(text).not.toContain(PASSWORD);
    expect(text).not.toContain("pbkdf2-sha256$");
  });

  it("hashes once for concurrent checks of one user", async () => {
    const old = await hashSecret(PASSWORD, 1_000);
    let calls = 0;
    const upgrader = new PasswordUpgrader(1_200);
    const store = async () => {
      calls++;
      return true;
    };
    await Promise.all([
      upgrader.upgrade("u1", PASSWORD, old, store),
      upgrader.upgrade("u1", PASSWORD, old, store),
    ]);
    expect(calls).toBe(1);
  });
});
