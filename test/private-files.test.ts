import {
  chmodSync,
  chownSync,
  existsSync,
  lchownSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { loadMasterKey, MASTER_KEY_FILE_NAME } from "../src/auth/master-key.js";
import { ensureDevCertificates } from "../src/certs/dev-ca.js";
import { assertOwned } from "../src/private-files.js";
import { prepareSqliteFiles, sqlitePath } from "../src/storage/sqlite-files.js";
import { withFileLock } from "../src/storage/startup-lock.js";

/**
 * The files the server keeps its secrets in, or trusts, must be its own user's: the checks
 * behind start-up's refusals (test/security/foreign-data-files.test.ts drives them through a
 * start). Cases with a file of another user chown it to nobody, so they run as root only
 * (as CI does); the rest run as anyone.
 */
const OTHER_UID = 65534; // nobody
const root = process.getuid?.() === 0;
const auth = { previousMasterKeys: [] } as never;

function folder(): string {
  return mkdtempSync(join(tmpdir(), "tessera-private-"));
}

describe("assertOwned", () => {
  it("names the owner, and suggests running as that user rather than only a chown", () => {
    // As root a file is given to nobody; as anyone else, / is root's.
    let path = "/";
    if (root) {
      path = join(folder(), "theirs");
      writeFileSync(path, "");
      chownSync(path, OTHER_UID, OTHER_UID);
    }
    const [uid, name] = root ? [OTHER_UID, "nobody"] : [0, "root"];
    expect(() => assertOwned(path, "database folder")).toThrow(
      new RegExp(`owned by another user, uid ${uid} \\(${name}\\).*sudo -u ${name} tessera serve`),
    );
  });

  it("accepts a file of its own, and a link of its own to one", () => {
    const dir = folder();
    writeFileSync(join(dir, "mine"), "");
    symlinkSync(join(dir, "mine"), join(dir, "link"));
    symlinkSync(join(dir, "missing"), join(dir, "dangling"));
    for (const f of ["mine", "link", "dangling", "absent"]) assertOwned(join(dir, f), "file");
  });

  it.skipIf(!root)(
    "refuses a dangling link another user made: what is created through it lands where they chose",
    () => {
      const dir = folder();
      const link = join(dir, "tessera.db");
      symlinkSync(join(dir, "elsewhere.db"), link);
      lchownSync(link, OTHER_UID, OTHER_UID);
      expect(() => assertOwned(link, "database file")).toThrow(/owned by another user, uid 65534/);
    },
  );

  it.skipIf(!root)("refuses a link of its own to a file another user owns", () => {
    const dir = folder();
    writeFileSync(join(dir, "theirs"), "");
    chownSync(join(dir, "theirs"), OTHER_UID, OTHER_UID);
    symlinkSync(join(dir, "theirs"), join(dir, "link"));
    expect(() => assertOwned(join(dir, "link"), "file")).toThrow(/owned by another user/);
  });
});

describe("a database file behind a symbolic link", () => {
  /** data/tessera.db -> shared/tessera.db, as SQLite then opens it. */
  function linked(): { data: string; shared: string; link: string } {
    const base = folder();
    const data = join(base, "data");
    const shared = join(base, "shared");
    mkdirSync(data, { mode: 0o700 });
    mkdirSync(shared, { mode: 0o700 });
    const link = join(data, "tessera.db");
    symlinkSync(join(shared, "tessera.db"), link);
    return { data, shared, link };
  }

  it("is the link's target, where SQLite keeps the -wal and -shm", () => {
    const { shared, link } = linked();
    expect(sqlitePath(link)).toBe(join(shared, "tessera.db"));
    writeFileSync(join(shared, "tessera.db"), "");
    expect(sqlitePath(link)).toBe(join(shared, "tessera.db"));
  });

  it("has the -wal and -shm beside the target tightened, not beside the link", () => {
    const { shared, link } = linked();
    writeFileSync(join(shared, "tessera.db"), "", { mode: 0o600 });
    for (const suffix of ["-wal", "-shm"]) {
      writeFileSync(join(shared, `tessera.db${suffix}`), "");
      chmodSync(join(shared, `tessera.db${suffix}`), 0o644);
    }
    expect(prepareSqliteFiles(link)).toBe(join(shared, "tessera.db"));
    for (const suffix of ["-wal", "-shm"])
      expect(statSync(join(shared, `tessera.db${suffix}`)).mode & 0o777).toBe(0o600);
  });

  it("leaves the target's folder its mode (the operator's group and setgid bits)", () => {
    for (const mode of [0o750, 0o2770]) {
      const { shared, link } = linked();
      chmodSync(shared, mode);
      expect(prepareSqliteFiles(link)).toBe(join(shared, "tessera.db"));
      expect(statSync(shared).mode & 0o7777).toBe(mode);
      expect(statSync(join(shared, "tessera.db")).mode & 0o777).toBe(0o600);
    }
  });

  it("leaves a home reached through a symbolic link its mode (/home -> /usr/home)", () => {
    const base = folder();
    const realHome = join(base, "usr", "home", "u");
    mkdirSync(realHome, { recursive: true, mode: 0o755 });
    chmodSync(realHome, 0o755);
    symlinkSync(join(base, "usr", "home"), join(base, "home"));
    const home = process.env.HOME;
    process.env.HOME = join(base, "home", "u");
    try {
      expect(prepareSqliteFiles(join(base, "home", "u", "tessera.db"))).toBe(join(realHome, "tessera.db"));
    } finally {
      process.env.HOME = home;
    }
    expect(statSync(realHome).mode & 0o7777).toBe(0o755);
  });

  it.skipIf(!root)("refuses a WAL another user planted beside the target", () => {
    const { shared, link } = linked();
    chmodSync(shared, 0o1777);
    writeFileSync(join(shared, "tessera.db-wal"), "", { mode: 0o666 });
    chownSync(join(shared, "tessera.db-wal"), OTHER_UID, OTHER_UID);
    expect(() => prepareSqliteFiles(link)).toThrow(
      /database file .*shared\/tessera\.db-wal: it is owned by another user/,
    );
  });

  it.skipIf(!root)("refuses a target folder another user owns", () => {
    const { shared, link } = linked();
    chownSync(shared, OTHER_UID, OTHER_UID);
    expect(() => prepareSqliteFiles(link)).toThrow(/database folder .*shared: it is owned by another user/);
    expect(existsSync(join(shared, "tessera.db"))).toBe(false);
  });
});

describe("the generated master key file", () => {
  it("is not read through a symbolic link", () => {
    const dir = folder();
    const elsewhere = join(folder(), "key");
    writeFileSync(elsewhere, `${Buffer.alloc(32, 7).toString("base64")}\n`, { mode: 0o600 });
    symlinkSync(elsewhere, join(dir, MASTER_KEY_FILE_NAME));
    expect(() => loadMasterKey(auth, { kind: "sqlite", location: join(dir, "tessera.db") } as never)).toThrow(
      /is a symbolic link/,
    );
  });

  it("is generated 0600 once and read back the same", () => {
    const dir = folder();
    const target = { kind: "sqlite", location: join(dir, "tessera.db") } as never;
    const first = loadMasterKey(auth, target);
    expect(statSync(join(dir, MASTER_KEY_FILE_NAME)).mode & 0o777).toBe(0o600);
    chmodSync(join(dir, MASTER_KEY_FILE_NAME), 0o644);
    expect(loadMasterKey(auth, target).id).toBe(first.id);
    expect(statSync(join(dir, MASTER_KEY_FILE_NAME)).mode & 0o777).toBe(0o600);
    expect(readFileSync(join(dir, MASTER_KEY_FILE_NAME), "utf8")).toMatch(/^[A-Za-z0-9+/]{43}=\n$/);
  });

  it("takes others' bits from an older key, and keeps the owner's (a 0400 key is not made writable)", () => {
    for (const [before, after] of [
      [0o400, 0o400],
      [0o440, 0o400],
      [0o644, 0o600],
    ]) {
      const dir = folder();
      writeFileSync(join(dir, MASTER_KEY_FILE_NAME), `${Buffer.alloc(32, 7).toString("base64")}\n`);
      chmodSync(join(dir, MASTER_KEY_FILE_NAME), before);
      loadMasterKey(auth, { kind: "sqlite", location: join(dir, "tessera.db") } as never);
      expect(statSync(join(dir, MASTER_KEY_FILE_NAME)).mode & 0o777).toBe(after);
    }
  });

  it.skipIf(!root)("refuses one another user owns, by the descriptor it reads", () => {
    const dir = folder();
    writeFileSync(join(dir, MASTER_KEY_FILE_NAME), `${Buffer.alloc(32, 7).toString("base64")}\n`);
    chownSync(join(dir, MASTER_KEY_FILE_NAME), OTHER_UID, OTHER_UID);
    expect(() => loadMasterKey(auth, { kind: "sqlite", location: join(dir, "tessera.db") } as never)).toThrow(
      /master key file .*: it is owned by another user/,
    );
  });
});

describe.skipIf(!root)("the start-up lock file", () => {
  it("is refused when another user planted it (they could hold it locked for ever)", async () => {
    const lock = join(folder(), "tessera.db-startup.lock");
    writeFileSync(lock, "", { mode: 0o666 });
    chownSync(lock, OTHER_UID, OTHER_UID);
    await expect(withFileLock(lock, async () => "ran")).rejects.toThrow(
      /start-up lock file .*owned by another user/,
    );
  });
});

describe.skipIf(!root)("a complete development certificate set", () => {
  /** A complete set made here, then given to another user with its folder. */
  async function given(files: string[]): Promise<string> {
    const dir = join(folder(), "certs");
    await ensureDevCertificates(dir);
    for (const f of ["ca.crt", "ca.key", "server.crt", "server.key"])
      if (!files.includes(f)) rmSync(join(dir, f));
    for (const f of files) chownSync(join(dir, f), OTHER_UID, OTHER_UID);
    chownSync(dir, OTHER_UID, OTHER_UID);
    return dir;
  }

  it("is refused with its CA key in a folder another user owns: their CA, trusted for clients", async () => {
    const dir = await given(["ca.crt", "ca.key", "server.crt", "server.key"]);
    await expect(ensureDevCertificates(dir)).rejects.toThrow(/certificate folder .*owned by another user/);
  });

  it("is refused when another user owns its CA key, in a folder of its own", async () => {
    const dir = await given(["ca.crt", "ca.key", "server.crt", "server.key"]);
    chownSync(dir, 0, 0);
    await expect(ensureDevCertificates(dir)).rejects.toThrow(
      /development certificate file .*owned by another user/,
    );
  });

  it("is used without its CA key (a production set, mounted as its owner chose)", async () => {
    const dir = await given(["ca.crt", "server.crt", "server.key"]);
    await expect(ensureDevCertificates(dir)).resolves.toEqual({ created: false, dir });
  });
});
