import { describe, expect, it } from "vitest";
import {
  dummyPasswordHash,
  hashOutdated,
  hashParametersDiffer,
  hashSecret,
  parseHash,
  verifySecret,
} from "../src/auth/password.js";
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
    await upgrader.upgrade("user", "u1", PASSWORD, old, async (from, to) => {
      stored.push([from, to]);
      return true;
    });
    expect(stored).toHaveLength(1);
    expect(stored[0]![0]).toBe(old);
    expect(parseHash(stored[0]![1])!.iterations).toBe(1_200);
    expect(await verifySecret(PASSWORD, stored[0]![1])).toBe(true);
    expect(upgrader.stats().user).toEqual({ upgraded: 1, deferred: 0, failed: 0 });
    expect(upgrader.stats().machine).toEqual({ upgraded: 0, deferred: 0, failed: 0 });
  });

  it("leaves a hash at the current iterations alone", async () => {
    const current = await hashSecret(PASSWORD, 1_000);
    let calls = 0;
    const upgrader = new PasswordUpgrader(1_000);
    await upgrader.upgrade("user", "u1", PASSWORD, current, async () => {
      calls++;
      return true;
    });
    expect(calls).toBe(0);
    expect(upgrader.stats().user.upgraded).toBe(0);
  });

  it("never throws when the new hash cannot be stored: counts it and warns once per run, with no secret", async () => {
    const old = await hashSecret(PASSWORD, 1_000);
    const logger = recordingLogger();
    const upgrader = new PasswordUpgrader(1_200, logger);
    const failing = async (): Promise<boolean> => {
      throw new Error(`connection lost while writing ${old}`);
    };
    await expect(upgrader.upgrade("user", "u1", PASSWORD, old, failing)).resolves.toBeUndefined();
    await expect(upgrader.upgrade("machine", "c2", PASSWORD, old, failing)).resolves.toBeUndefined();
    expect(upgrader.stats().user).toEqual({ upgraded: 0, deferred: 0, failed: 1 });
    expect(upgrader.stats().machine).toEqual({ upgraded: 0, deferred: 0, failed: 1 });
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
      upgrader.upgrade("user", "u1", PASSWORD, old, store),
      upgrader.upgrade("user", "u1", PASSWORD, old, store),
    ]);
    expect(calls).toBe(1);
  });

  it("answers the hash it stored, and nothing when the store found the hash changed meanwhile", async () => {
    const old = await hashSecret(PASSWORD, 1_000);
    const upgrader = new PasswordUpgrader(1_200);
    const made = await upgrader.upgrade("machine", "c1", PASSWORD, old, async () => true);
    expect(parseHash(made!)!.iterations).toBe(1_200);
    expect(await upgrader.upgrade("machine", "c1", PASSWORD, old, async () => false)).toBeUndefined();
    expect(upgrader.stats().machine).toEqual({ upgraded: 1, deferred: 0, failed: 0 });
  });

  it("keeps a user's and a machine credential's upgrades apart, even under one id", async () => {
    const old = await hashSecret(PASSWORD, 1_000);
    const upgrader = new PasswordUpgrader(1_200);
    const store = async () => true;
    await Promise.all([
      upgrader.upgrade("user", "same", PASSWORD, old, store),
      upgrader.upgrade("machine", "same", PASSWORD, old, store),
    ]);
    expect(upgrader.stats().user.upgraded).toBe(1);
    expect(upgrader.stats().machine.upgraded).toBe(1);
  });

  it("never re-hashes a stronger hash (a higher count another instance made) down to the current iterations", async () => {
    const stronger = await hashSecret(PASSWORD, 1_500);
    let calls = 0;
    const upgrader = new PasswordUpgrader(1_200);
    expect(upgrader.outdated(stronger)).toBe(false);
    await upgrader.upgrade("user", "u1", PASSWORD, stronger, async () => {
      calls++;
      return true;
    });
    expect(calls).toBe(0);
    // Yet a refused account with it costs what an unknown name costs here: the stand-in.
    expect(await upgrader.refusalHash(stronger)).toBe(await dummyPasswordHash(1_200));
  });

  it("checks a refused account's password against the stand-in when its own hash is outdated", async () => {
    const upgrader = new PasswordUpgrader(1_200);
    const old = await hashSecret(PASSWORD, 1_000);
    const current = await hashSecret(PASSWORD, 1_200);
    expect(await upgrader.refusalHash(old)).toBe(await dummyPasswordHash(1_200));
    expect(await upgrader.refusalHash(current)).toBe(current);
  });
});

describe("PasswordUpgrader's shape check", () => {
  it("tells outdated hashes as hashOutdated does and differing ones as hashParametersDiffer does, current ones included", async () => {
    const upgrader = new PasswordUpgrader(1_200);
    const current = await hashSecret(PASSWORD, 1_200);
    const [, , salt, hash] = current.split("$");
    const shapes = [
      current,
      await hashSecret(PASSWORD, 1_000),
      await hashSecret(PASSWORD, 12_000),
      `pbkdf2-sha256$1200$${Buffer.alloc(15).toString("base64")}$${Buffer.alloc(36).toString("base64")}`,
      `pbkdf2-sha256$1200$${salt}$${Buffer.alloc(31).toString("base64")}`,
      `pbkdf2-sha256$1200$${Buffer.alloc(18).toString("base64")}$${hash}`,
      "not a hash at all",
    ];
    for (const stored of shapes) {
      expect([stored, upgrader.outdated(stored)]).toEqual([stored, hashOutdated(stored, 1_200)]);
      expect([stored, (await upgrader.refusalHash(stored)) !== stored]).toEqual([
        stored,
        hashParametersDiffer(stored, 1_200),
      ]);
    }
  });
});
