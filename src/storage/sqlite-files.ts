// The SQLite database file and its folder: who may read them.
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, parse, resolve } from "node:path";
import { assertOwned } from "../private-files.js";

/**
 * The database holds password hashes and sealed signing keys: its folder is made 0700
 * and its file 0600 before SQLite opens it (an existing file, and a folder of its own
 * that is not the working directory, are tightened), so nobody else can read it or a
 * copy SQLite writes beside it.
 */
export function prepareSqliteFiles(location: string): void {
  const dir = dirname(resolve(location));
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  else {
    assertOwned(dir, "database folder", true);
    if (![process.cwd(), homedir(), parse(dir).root].includes(dir) && ownFolder(dir)) chmodSync(dir, 0o700);
  }
  // A WAL or rollback journal left beside the database is replayed into it when SQLite opens it.
  for (const suffix of ["", "-wal", "-shm", "-journal"]) assertOwned(`${location}${suffix}`, "database file");
  // Created empty with its final mode: SQLite takes an empty file as a new database.
  closeSync(openSync(location, "a", 0o600));
  tighten(location, 0o600);
}

/** A folder this process owns and that is not shared (sticky, like /tmp). */
function ownFolder(dir: string): boolean {
  const st = statSync(dir);
  return (process.getuid === undefined || st.uid === process.getuid()) && (st.mode & 0o1000) === 0;
}

/** Give `path` exactly `mode` (permission bits) if it exists. */
export function tighten(path: string, mode: number): void {
  try {
    if ((statSync(path).mode & 0o777) !== mode) chmodSync(path, mode);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
}
