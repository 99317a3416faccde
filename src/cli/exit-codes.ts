/**
 * The exit codes of `tessera`, one per kind of failure, so a script can branch on them.
 * This module imports nothing: `--help` prints the table without loading the SDK.
 */
export const EXIT = {
  ok: 0,
  error: 1,
  usage: 2,
  unauthenticated: 3,
  permissionDenied: 4,
  notFound: 5,
  unavailable: 6,
  rateLimited: 7,
  alreadyExists: 8,
  /**
   * The reader of stdout went away (`tessera --help | head -5`): 128 + SIGPIPE, the status a
   * shell reports for git and gh, which die of SIGPIPE there. Node ignores the signal and
   * sees EPIPE instead, so the CLI exits with the same status itself, silently.
   */
  brokenPipe: 141,
} as const;

/** The exit codes a failure maps to (the {@link EXIT} table). */
export type ExitCodes = typeof EXIT;

/** One line per code, as `--help` and the README print them. */
export const EXIT_HELP = `Exit codes:
  0  ok
  1  error (a server-side failure or a bug; the message says which)
  2  usage: a bad flag or argument (an empty or malformed id among them), a file that
     exists and needs --force, a bad configuration or credentials file, or a request the
     server rejects as invalid
  3  unauthenticated: no credential, or one the server does not accept
  4  permission denied: the credential lacks a scope or may not manage the object
  5  not found (another tenant's objects read as not found too)
  6  unavailable: the server cannot be reached or is not ready (retry later)
  7  rate limited: wait the printed Retry-After seconds and retry
  8  already exists: the name is taken
  141  stdout was closed early (\`tessera … | head\`): the output stops there, silently,
     with the status git and gh have there (128 + SIGPIPE)`;

/** A mistake in how a command was called that the parser cannot see (exit 2). */
export class UsageError extends Error {
  override name = "UsageError";
}
