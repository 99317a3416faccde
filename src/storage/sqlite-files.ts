// The SQLite database file and its folder: who may read them.
import { chmodSync, closeSync, existsSync, lstatSync, mkdirSync, openSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, parse, resolve } from "node:path";

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

/**
 * Refuse `path` (when it exists) if another user owns it, or owns the link at it: the owner
 * of the folder can swap the database and the master key between starts, and the owner of
 * a file reads it through a descriptor opened before the server tightened its mode (root
 * tightens anyone's file, and its owner can loosen it again). `rootToo`: a folder of root's
 * is accepted (root can do anything anyway; /srv, the working directory). As PostgreSQL
 * refuses a data directory of another owner.
 */
export function assertOwned(path: string, what: string, rootToo = false): void {
  if (process.getuid === undefined) return;
  const uid = process.getuid();
  let owners: number[];
  try {
    owners = [lstatSync(path).uid, statSync(path).uid];
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
    throw err;
  }
  for (const owner of owners)
    if (owner !== uid && !(rootToo && owner === 0))
      throw new Error(
        `refusing to use ${what} ${path}: it is owned by another user (uid ${owner}), who could read or replace the secrets in it; ` +
          `give it to the user running Tessera (chown), or choose another location`,
      );
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
