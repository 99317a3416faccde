// A file of the server's secrets (the TLS private key, the master key file) that any user of the
// machine may read is refused at start, as the SDK refuses such a credentials file.
import { statSync } from "node:fs";

/**
 * Refuse `path` when its mode lets users other than its owner and group read or write it
 * (`o+r`, `o+w`): `what` names it in the message, which says how to fix it. Group access is
 * allowed: an operator may give the key to the service's group (`root:tessera 0640`).
 * @throws Error naming the file, its mode and the chmod that fixes it
 */
export function refuseOpenToOthers(path: string, what: string): void {
  // Windows reports no permission bits of its own (every writable file reads 0666).
  if (process.platform === "win32") return;
  const mode = statSync(path).mode;
  if ((mode & 0o006) === 0) return;
  const octal = `0${(mode & 0o777).toString(8).padStart(3, "0")}`;
  throw new Error(
    `refusing ${what} ${path}: its mode ${octal} lets any user of the machine read it; restrict it with: chmod 600 ${path} (or 640 for a group that runs Tessera)`,
  );
}
