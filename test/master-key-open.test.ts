import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it, vi } from "vitest";
import { loadMasterKey, MASTER_KEY_FILE_NAME } from "../src/auth/master-key.js";

/**
 * The generated master key's open as other platforms answer it, which Linux does not: where
 * O_NOFOLLOW is 0 (Windows) a dangling link at master.key is missing to open and present to
 * create, and FreeBSD refuses a link with EMLINK rather than ELOOP. node:fs's openSync answers
 * for the one path under test as those would; every other file is opened for real.
 */
const fake = vi.hoisted(() => ({ path: "", open: "", create: "" }));
vi.mock("node:fs", async (importOriginal) => {
  const fs = await importOriginal<typeof import("node:fs")>();
  const openSync = (path: string, flags: number, mode?: number) => {
    if (path === fake.path) {
      const code = flags & fs.constants.O_CREAT ? fake.create : fake.open;
      throw Object.assign(new Error(`${code}: ${path}`), { code });
    }
    return fs.openSync(path, flags, mode);
  };
  return { ...fs, openSync, default: { ...fs, openSync } };
});

const auth = { previousMasterKeys: [] } as never;

function keyIn(): { path: string; target: never } {
  const dir = mkdtempSync(join(tmpdir(), "tessera-mk-open-"));
  return {
    path: join(dir, MASTER_KEY_FILE_NAME),
    target: { kind: "sqlite", location: join(dir, "tessera.db") } as never,
  };
}

describe("the generated master key's open", () => {
  it("ends with an error on a link missing to open and present to create (no endless retry)", () => {
    const { path, target } = keyIn();
    Object.assign(fake, { path, open: "ENOENT", create: "EEXIST" });
    expect(() => loadMasterKey(auth, target)).toThrow(/cannot be opened, nor created as it exists/);
  });

  it("names a link FreeBSD refuses with EMLINK as a link", () => {
    const { path, target } = keyIn();
    Object.assign(fake, { path, open: "EMLINK", create: "EEXIST" });
    expect(() => loadMasterKey(auth, target)).toThrow(
      /is a symbolic link, which the generated key is not read/,
    );
  });
});
