// Files the server keeps its secrets in, or trusts, must be its own user's and closed to others.
import { lstatSync, readFileSync, type Stats, statSync } from "node:fs";
import { userInfo } from "node:os";

/**
 * Refuse `path` (when it exists) if another user owns it, or owns the link at it: the owner
 * of the folder can swap the database and the master key between starts, and the owner of
 * a file reads it through a descriptor opened before the server tightened its mode (root
 * tightens anyone's file, and its owner can loosen it again). `rootToo`: a folder of root's
 * is accepted (root can do anything anyway; /srv, the working directory). As PostgreSQL
 * refuses a data directory of another owner.
 *
 * A symbolic link is judged by its own owner first (root's is fine: `sudo ln -s`), then by
 * its target's; a dangling link of another user's is refused too, since whatever is created
 * through it lands where they chose.
 */
export function assertOwned(path: string, what: string, rootToo = false): void {
  if (process.getuid === undefined) return;
  const uid = process.getuid();
  const link = statOrNone(lstatSync, path);
  if (link === undefined) return;
  if (link.isSymbolicLink()) {
    if (link.uid !== uid && link.uid !== 0) refuse(path, what, link.uid, uid);
    const target = statOrNone(statSync, path);
    if (target !== undefined) assertOwnerOf(target, path, what, rootToo);
  } else assertOwnerOf(link, path, what, rootToo);
}

/**
 * Refuse `stats` (of `path`, e.g. an open descriptor's fstat) when another user owns it;
 * `rootToo` as in {@link assertOwned}.
 */
export function assertOwnerOf(stats: Stats, path: string, what: string, rootToo = false): void {
  const uid = process.getuid?.();
  if (uid !== undefined && stats.uid !== uid && !(rootToo && stats.uid === 0))
    refuse(path, what, stats.uid, uid);
}

function statOrNone(stat: (path: string) => Stats, path: string): Stats | undefined {
  try {
    return stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

function refuse(path: string, what: string, owner: number, uid: number): never {
  const name = userName(owner);
  const them = name !== undefined ? `uid ${owner} (${name})` : `uid ${owner}`;
  const us = userName(uid) ?? `uid ${uid}`;
  // Most often the folder is a service user's own: running as that user fixes it without
  // breaking the service, where a chown would take the folder away from it.
  throw new Error(
    `refusing to use ${what} ${path}: it is owned by another user, ${them}, not by the user running Tessera (${us}), ` +
      `so that user could read or replace the secrets in it; if it is Tessera's service user, run Tessera as that user ` +
      `(e.g. sudo -u ${name ?? `'#${owner}'`} tessera serve), else choose another location`,
  );
}

/** The login name of `uid` from /etc/passwd, when it can be read cheaply; else undefined. */
export function userName(uid: number): string | undefined {
  try {
    if (uid === process.getuid?.()) return userInfo().username;
    for (const line of readFileSync("/etc/passwd", "utf8").split("\n")) {
      const [name, , id] = line.split(":");
      if (id === String(uid) && name) return name;
    }
  } catch {
    // No passwd file (a container without one): the uid alone names the owner.
  }
  return undefined;
}

/**
 * What is wrong with `path` when its mode lets users other than its owner and group read or
 * write it (`o+r`, `o+w`), with how to fix it there and in the containers that commonly cause
 * it (a Kubernetes secret volume is 0644 unless told otherwise; rootless podman maps the
 * owner of a bind-mounted file to nobody, which tempts a chmod o+r); null when it is closed
 * to others. `what` names the file. Group access is allowed: an operator may give the key to
 * the service's group (`root:tessera 0640`).
 */
export function openToOthers(path: string, what: string): string | null {
  // Windows reports no permission bits of its own (every writable file reads 0666).
  if (process.platform === "win32") return null;
  const mode = statSync(path).mode;
  if ((mode & 0o006) === 0) return null;
  const octal = `0${(mode & 0o777).toString(8).padStart(3, "0")}`;
  const access = mode & 0o004 ? (mode & 0o002 ? "read and write" : "read") : "write";
  return (
    `${what} ${path}: its mode ${octal} lets any user of the machine ${access} it; restrict it with ` +
    `chmod 600 ${path} (or 640 for a group that runs Tessera); in a Kubernetes secret volume set ` +
    `defaultMode: 0400 (or 0440 with the pod's securityContext.fsGroup); for a rootless podman bind ` +
    `mount run the container with --userns=keep-id rather than opening the file to others`
  );
}

/**
 * Refuse `path` when it is open to others ({@link openToOthers}): at start, as PostgreSQL
 * refuses such a server key, a secret anyone on the machine can read is not served.
 * @throws Error naming the file, its mode and how to fix it
 */
export function refuseOpenToOthers(path: string, what: string): void {
  const problem = openToOthers(path, what);
  if (problem !== null) throw new Error(`refusing ${problem}`);
}
