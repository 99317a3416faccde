import { existsSync, type FSWatcher, watch } from "node:fs";

/**
 * Files of the cert folder whose change means "reload the TLS material". Not ca.key: the
 * server never reads it (it only checks its mode), so a change of it changes nothing served,
 * and a reload for another file warns about its mode anyway.
 */
export const TLS_FILES: ReadonlySet<string> = new Set(["ca.crt", "server.crt", "server.key", "ca.crl"]);

/** A running watch; `close` stops it and cancels a pending reload. */
export interface TlsFileWatch {
  close(): void;
}

/**
 * Watch the cert folder and call `reload` once things settle (debounced) after any of
 * {@link TLS_FILES} changes, appears or disappears. Renames count too, so an atomic
 * replace (write a temp file, rename over) and Kubernetes secret volumes (which swap a
 * `..data` symlink) both trigger one reload. The watch does not keep the process alive.
 * Returns null when the folder does not exist (nothing to watch).
 */
export function watchTlsFiles(
  dir: string,
  reload: () => void,
  options: { debounceMs?: number; onError?: (err: Error) => void } = {},
): TlsFileWatch | null {
  if (!existsSync(dir)) return null;
  const debounceMs = options.debounceMs ?? 300;
  let timer: NodeJS.Timeout | undefined;
  let watcher: FSWatcher;
  try {
    watcher = watch(dir, { persistent: false }, (_event, filename) => {
      const name = filename?.toString() ?? null;
      if (name !== null && !TLS_FILES.has(name) && name !== "..data") return;
      if (timer) clearTimeout(timer);
      timer = setTimeout(() => {
        timer = undefined;
        reload();
      }, debounceMs);
      timer.unref();
    });
  } catch (err) {
    options.onError?.(err as Error);
    return null;
  }
  watcher.on("error", (err) => options.onError?.(err));
  return {
    close() {
      if (timer) clearTimeout(timer);
      timer = undefined;
      watcher.close();
    },
  };
}
