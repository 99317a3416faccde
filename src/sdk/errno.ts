/** The words of the file and socket errors a user can fix, by their errno code. */
const WORDS: Readonly<Record<string, string>> = {
  ENOENT: "no such file",
  EACCES: "permission denied",
  EADDRINUSE: "address already in use",
  EADDRNOTAVAIL: "address not available",
};

/**
 * What a failed file or socket call means, in words, when its errno code is one a user
 * can fix (shared by the SDK's certificate files and the server's listen check).
 */
export function errnoWords(err: unknown): string | undefined {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === undefined ? undefined : WORDS[code];
}
