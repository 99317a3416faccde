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
