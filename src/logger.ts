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

/**
 * The access log's logger (one line per call, see call-observer.ts): the service logger's
 * level, base fields and stream (stderr), with writes gathered up to 4 KiB instead of one
 * write(2) per line, flushed at least every second and when the process exits; and no
 * redaction list, since an access line is built field by field from ids, codes and the
 * client address and never holds an object of the caller's.
 *
 * Why: measured on the bench machine (bench/results/2026-12-04-metrics.md), an access line
 * through the service logger cost 8–15 µs of CPU (its redaction pass alone about 6 µs, one
 * write(2) per line about 3 µs), on authenticated calls of about 100 µs; this way 4–6 µs.
 * The price: access lines reach stderr up to a second late (each carries its own time),
 * and the last few are lost if the process is killed outright (SIGKILL, a crash of V8).
 */
export function createAccessLogger(level: string): Logger {
  const destination = pino.destination({ dest: 2, sync: true, minLength: 4096 });
  const timer = setInterval(() => destination.flush(), 1000);
  timer.unref();
  process.once("exit", () => {
    clearInterval(timer);
    destination.flushSync();
  });
  return pino({ level, base: { service: "tessera" } }, destination);
}
