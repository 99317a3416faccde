// Writing certificate files: never overwriting what an operator made, and replacing what must be
// replaced atomically, so no reader sees a half-written key or certificate.
import { randomBytes } from "node:crypto";
import { rename, stat, unlink, writeFile } from "node:fs/promises";

export async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  }
}

/**
 * Write a file that must not exist yet. The `wx` flag makes the no-overwrite promise hold even if
 * another process creates the file between our existence check and this write.
 */
export async function writeNewFile(path: string, content: string, mode: number): Promise<void> {
  try {
    await writeFile(path, content, { flag: "wx", mode });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") {
      throw new Error(`refusing to overwrite existing file ${path}`);
    }
    throw err;
  }
}

/**
 * Replace a file atomically: write a sibling temp file with the final mode, then rename over the target.
 * Readers (a server reloading a CRL, an SDK reading its cert folder) never see a half-written file, and a
 * key replacing an older world-readable file still ends up 0600 because the mode comes from the new inode.
 */
export async function replaceFile(path: string, content: string, mode: number): Promise<void> {
  const tmp = `${path}.${randomBytes(6).toString("hex")}.tmp`;
  await writeFile(tmp, content, { flag: "wx", mode });
  try {
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
}
