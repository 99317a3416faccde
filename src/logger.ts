import { type Logger, pino } from "pino";

/** The service logger's redaction list (a second line of defence; see createLogger). */
export const REDACT = {
  paths: [
    "password",
    "token",
    "*.password",
    "*.token",
    "*.authorization",
    "*.refreshToken",
    "*.accessToken",
    "headers.authorization",
    'headers["x-api-key"]',
  ],
  censor: "[redacted]",
};

/**
 * The service logger (JSON lines on stderr, so stdout stays for what commands print,
 * such as a generated password or token shown once). Credentials are never passed to
 * it; the redaction list is a second line of defence.
 */
export function createLogger(level: string): Logger {
  return pino(
    {
      level,
      base: { service: "tessera" },
      redact: REDACT,
    },
    pino.destination(2),
  );
}

/** Access lines lost because the access log's buffer was full (process-wide, like stderr itself). */
export const accessLogStats = { dropped: 0 };

/** Bytes of access lines the access log holds while stderr's reader falls behind; past it lines are dropped (counted). */
export const ACCESS_LOG_BUFFER_BYTES = 16 * 1024 * 1024;

/**
 * The access log's logger (one line per call, see call-observer.ts): the service logger's
 * level, base fields and stream (stderr), with writes gathered up to 4 KiB and written
 * asynchronously (libuv's thread pool), flushed at least every second and when the process
 * exits; and no redaction list, since an access line is built field by field from ids,
 * codes and the client address and never holds an object of the caller's.
 *
 * Why asynchronous: a synchronous write blocks the event loop whenever stderr's reader (a
 * pipe to journald, a container runtime, a test harness) is slower than the calls, and
 * every call then waits for the log. Asynchronous writes are held in memory up to
 * {@link ACCESS_LOG_BUFFER_BYTES}; past it a line is dropped, counted
 * (`tessera_access_log_dropped_total`) and the first drop is reported through `onDrop`.
 * The price: the last lines are lost if the process is killed outright (SIGKILL, a crash of V8).
 */
export function createAccessLogger(level: string, onDrop?: () => void): Logger {
  const destination = pino.destination({
    dest: 2,
    sync: false,
    minLength: 4096,
    maxLength: ACCESS_LOG_BUFFER_BYTES,
  });
  destination.on("drop", () => {
    if (accessLogStats.dropped++ === 0) onDrop?.();
  });
  const timer = setInterval(() => destination.flush(), 1000);
  timer.unref();
  return pino({ level, base: { service: "tessera" } }, destination);
}
