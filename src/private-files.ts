// Files the server keeps its secrets in, or trusts, must be its own user's and closed to others.
import { lstatSync, statSync } from "node:fs";

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
