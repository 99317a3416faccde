// The SQLite database file and its folder: who may read them.
import {
  chmodSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readlinkSync,
  realpathSync,
  statSync,
} from "node:fs";
import { homedir } from "node:os";
import { basename, dirname, join, parse, resolve } from "node:path";
import { assertOwned } from "../private-files.js";

/** The files SQLite keeps beside the database: a WAL or rollback journal is replayed into it. */
const SIDE_FILES = ["-wal", "-shm", "-journal"];

/**
 * The database holds password hashes and sealed signing keys: its folder is made 0700
 * and its file 0600 before SQLite opens it (an existing file, and a folder of its own
 * that is not the working directory, are tightened), so nobody else can read it or a
 * copy SQLite writes beside it.
 * @returns The file SQLite opens (`location` with symbolic links resolved), beside which it
 * keeps its -wal, -shm and -journal.
 */
export function prepareSqliteFiles(location: string): string {
  const dir = dirname(resolve(location));
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  else closeFolder(dir);
  // The link itself, if it is one (another user's would point the database where they chose).
  assertOwned(location, "database file");
  // SQLite follows a symbolic link and keeps its side files beside the target, not the link:
  // the files checked and tightened are those. A folder the link leads to is the operator's
  // choice (group bits, setgid): its owner is checked, its mode left as it is.
  const real = sqlitePath(location);
  if (dirname(real) !== realOrSelf(dir)) assertOwned(dirname(real), "database folder", true);
  for (const suffix of ["", ...SIDE_FILES]) assertOwned(`${real}${suffix}`, "database file");
  // Created empty with its final mode: SQLite takes an empty file as a new database.
  closeSync(openSync(real, "a", 0o600));
  for (const suffix of ["", ...SIDE_FILES]) tighten(`${real}${suffix}`, 0o600);
  return real;
}

/** Refuse a database folder of another user's (root's is fine), and make one of ours 0700. */
function closeFolder(dir: string): void {
  assertOwned(dir, "database folder", true);
  // Compared with links resolved: a home reached through one (/home -> /usr/home) is still the home.
  const real = realOrSelf(dir);
  const kept = [process.cwd(), homedir(), parse(dir).root].map(realOrSelf);
  if (!kept.includes(real) && ownFolder(dir)) chmodSync(dir, 0o700);
}

/** `path` with its symbolic links resolved, or as given when it cannot be (missing). */
function realOrSelf(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/**
 * The path SQLite opens for `location`: every symbolic link resolved, a dangling one to where
 * it points (SQLite creates the database there), a missing file in its folder's real path.
 */
export function sqlitePath(location: string): string {
  let path = resolve(location);
  for (let hops = 0; hops < 40; hops++) {
    try {
      return realpathSync(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    let target: string;
    try {
      target = readlinkSync(path);
    } catch {
      // Not a link: a file to be created in the real folder.
      return join(realpathSync(dirname(path)), basename(path));
    }
    path = resolve(dirname(path), target);
  }
  throw new Error(`too many symbolic links in the database path ${location}`);
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
